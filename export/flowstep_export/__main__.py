"""python -m flowstep_export --model PRESET --out DIR [--expert high_noise|low_noise] ..."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
import warnings
from pathlib import Path

from . import DEFAULT_ATTENTION_CHUNK
from .model.configs import PRESETS, get_config
from .model.lora import DEFAULT_TARGETS, LoraConfig

GRAPHS = ("training_model", "eval_model", "optimizer_model", "inference_model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowstep_export",
        description="Export the Wan DiT with LoRA into portable ONNX training artifacts for flowstep.",
    )
    p.add_argument("--model", required=True, choices=sorted(PRESETS), help="model configuration")
    p.add_argument("--out", required=True, type=Path, help="artifacts directory to write")
    p.add_argument("--base", type=Path, help="Wan checkpoint (.safetensors, Wan/DiffSynth keys; a leading `model.` "
                   "is stripped). Without it the model is initialised randomly, with a warning.")
    p.add_argument("--expert", choices=("high_noise", "low_noise"),
                   help="Wan2.2 A14B presets (wan2.2-t2v-a14b, wan2.2-i2v-a14b, tiny-a14b, tiny-i2v-a14b): which "
                        "expert of the pair this export is, each with its own --base checkpoint. The manifest records "
                        "it with its timestep range (high_noise [0, b), low_noise [b, 1] of DiffSynth's table, "
                        "b = 0.417 for T2V, 0.358 for I2V) and the timestep where sampling switches experts")
    p.add_argument("--shapes-only", action="store_true",
                   help="trace with uninitialised base weights that are never read (no memory for them), for a model "
                        "too large for this machine; the graphs carry no weights either way, so flowstep trains them "
                        "with --base later. Implies --no-validate; not with --base or --ship-base")
    p.add_argument("--ship-base", action="store_true", help="copy the base weights into the artifacts "
                   "(base.safetensors); for toy models. Otherwise flowstep reads the user's checkpoint.")
    g = p.add_argument_group("LoRA (DiffSynth defaults)")
    g.add_argument("--lora-rank", type=int, default=32, help="rank r (default 32)")
    g.add_argument("--lora-alpha", type=float, help="alpha; the update is scaled by alpha/r (default: alpha = rank)")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module name suffixes (default: %(default)s)")
    g.add_argument("--lora-init", choices=("kaiming", "gaussian"), default="kaiming",
                   help="A initialisation; B always starts at zero (default: kaiming)")
    g = p.add_argument_group("memory and precision")
    g.add_argument("--attention", choices=("chunked", "fused"),
                   help="chunked: attention in standard ONNX ops (a Scan over query chunks), runs on every provider; "
                        "fused: keep the com.flowstep FlashAttention/FlashAttentionGrad operators, which flowstep "
                        "implements itself (blocked FlashAttention kernels on the CPU, faster and smaller than "
                        "chunked there; cuDNN on CUDA with --features cuda-attention, bf16 only; "
                        "docs/fused-attention.md) (default: fused for float32, the CPU's precision; chunked for "
                        "bfloat16, the GPU's, and whenever --attention-chunk is given)")
    g.add_argument("--attention-chunk", type=int, default=None, metavar="N",
                   help="chunked attention: queries per chunk; the backward recomputes each chunk's probabilities, "
                        "so the largest attention tensor is [heads, N, tokens] (default %d)" % DEFAULT_ATTENTION_CHUNK)
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's forward in the backward (DiffSynth's use_gradient_checkpointing): "
                        "less memory, more time")
    g.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="base weights and activations; LoRA parameters, gradients, AdamW, norms, softmax "
                        "statistics and the loss stay float32 (default: float32)")
    g.add_argument("--base-dtype", choices=("float8_e4m3fn",),
                   help="store the blocks' Linear weights as float8_e4m3fn graph inputs with float32 scales, "
                        "dequantized to --precision inside the graph (about half a bf16 base's memory); flowstep then "
                        "reads ComfyUI's *_fp8_e4m3fn / *_fp8_scaled files, musubi's block-wise fp8_scaled ones, or a "
                        "checkpoint converted with python -m flowstep_export.model.fp8 (default: the --precision dtype)")
    g.add_argument("--fp8-scale", choices=("tensor", "block"),
                   help="with --base-dtype float8_e4m3fn: one scale per weight (ComfyUI's fp8_scaled) or one per 64 "
                        "inputs of each row (musubi's block-wise fp8_scaled; also takes per-tensor files) (default: tensor)")
    p.add_argument("--seed", type=int, default=0, help="seed for random base and LoRA init (default 0)")
    p.add_argument("--graphs", default=",".join(GRAPHS), help="graphs to export (default: all)")
    p.add_argument("--latent", help="example latent size FRAMES,HEIGHT,WIDTH used for tracing and validation")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p.parse_args(argv)


def attention_impl(args: argparse.Namespace) -> str:
    """--attention, or its default: fused where flowstep's fused kernels are the fast path (the
    CPU, which trains float32; BENCHMARKS.md, issue 25), chunked for bfloat16 exports, which
    train on GPUs, where a default build has no fused kernels and chunked runs everywhere."""
    if args.attention == "fused" and args.attention_chunk is not None:
        raise ValueError("--attention-chunk applies to chunked attention; fused attention has no chunks")
    if args.attention is not None:
        return args.attention
    return "fused" if args.precision == "float32" and args.attention_chunk is None else "chunked"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flowstep_export").setLevel(logging.WARNING if args.quiet else logging.INFO)
    warnings.filterwarnings("ignore")
    import dataclasses

    from .pipeline.export import ExportOptions, export_artifacts
    from .pipeline.validate import validate_artifacts

    try:
        config = get_config(args.model)
        if args.latent:
            frames, height, width = (int(v) for v in args.latent.split(","))
            if frames < 2 or height < 4 or width < 4 or height % 2 or width % 2:
                # torch.export fixes axes whose example size is 1: they would not be dynamic.
                raise ValueError(f"--latent {args.latent}: need frames >= 2 and even height, width >= 4 "
                                 "so that every latent axis stays dynamic")
            config = dataclasses.replace(config, example_latent=(frames, height, width))
        graphs = tuple(g for g in args.graphs.split(",") if g)
        unknown = set(graphs) - set(GRAPHS)
        if unknown:
            raise ValueError(f"unknown graphs {sorted(unknown)}; choose from {GRAPHS}")
        if args.fp8_scale is not None and args.base_dtype is None:
            raise ValueError("--fp8-scale applies to fp8 base weights: add --base-dtype float8_e4m3fn")
        if args.base is not None and not args.base.is_file():
            raise ValueError(f"--base {args.base}: no such file")
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                          targets=tuple(t for t in args.lora_targets.split(",") if t), init=args.lora_init)
        options = ExportOptions(out=args.out, base=args.base, seed=args.seed, lora=lora,
                                ship_base=args.ship_base, graphs=graphs, gradient_checkpointing=args.gradient_checkpointing,
                                precision=args.precision, attention=attention_impl(args), expert=args.expert,
                                shapes_only=args.shapes_only, base_dtype=args.base_dtype, fp8_scale=args.fp8_scale or "tensor")
        if args.attention_chunk is not None:
            if args.attention_chunk < 1:
                raise ValueError(f"--attention-chunk must be at least 1, got {args.attention_chunk}")
            options = dataclasses.replace(options, attention_chunk=args.attention_chunk)
        start = time.perf_counter()
        manifest = export_artifacts(config, options)
        seconds = time.perf_counter() - start
        report = {} if args.no_validate or args.shapes_only else validate_artifacts(args.out, config, options)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    sizes = {f: (args.out / f).stat().st_size for f in manifest["files"]}
    print(json.dumps({"out": str(args.out), "model": config.name, "lora_params": manifest["lora"]["num_params"],
                      "export_seconds": round(seconds, 1), "peak_rss_gb": round(peak_gb, 2),
                      "file_bytes": sizes, "validation": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
