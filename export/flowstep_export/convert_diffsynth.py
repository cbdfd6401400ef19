"""Convert DiffSynth-Studio's cached training samples to flowstep's dataset format.

DiffSynth's `--task sft:data_process` (`runner.launch_data_process_task`) writes one `.pth`
per sample: the pipeline inputs after the text encoder and VAE ran, a tuple
`(inputs_shared, inputs_posi, inputs_nega)` of dicts, with the VAE latents in
`inputs_shared["input_latents"]` ([1, 16, F, H, W]) and the umT5 embeddings in
`inputs_posi["context"]` ([1, 512, 4096]). flowstep reads one `.safetensors` per sample
with `latents` [C, F, H, W] and `context` [L, D].

python -m flowstep_export.convert_diffsynth CACHE_DIR OUT_DIR [--dtype bf16|f32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .deps import missing_module

LATENT_KEYS = ("input_latents",)
CONTEXT_KEYS = ("context", "prompt_emb")


def find(obj, keys):
    """The first tensor under one of `keys` in a dict, or in a tuple/list of dicts."""
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), torch.Tensor):
                return obj[k]
        return None
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = find(item, keys)
            if found is not None:
                return found
    return None


def available_keys(obj) -> list[str]:
    if isinstance(obj, dict):
        return sorted(obj)
    if isinstance(obj, (tuple, list)):
        return [k for item in obj for k in available_keys(item)]
    return []


def convert_sample(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # DiffSynth pickles whole dicts (not only tensors), so weights_only cannot be used:
    # convert only caches you made yourself.
    data = torch.load(path, map_location="cpu", weights_only=False)
    latents, context = find(data, LATENT_KEYS), find(data, CONTEXT_KEYS)
    if latents is None or context is None:
        missing = "input_latents" if latents is None else "context"
        raise ValueError(f"{path}: no `{missing}` tensor; keys found: {available_keys(data)}")
    if latents.dim() == 5:
        if latents.shape[0] != 1:
            raise ValueError(f"{path}: input_latents has batch {latents.shape[0]}; flowstep samples hold one video")
        latents = latents[0]
    if context.dim() == 3:
        context = context[0]
    if latents.dim() != 4 or context.dim() != 2:
        raise ValueError(f"{path}: expected latents [C,F,H,W] and context [L,D], got {list(latents.shape)} and {list(context.shape)}")
    out = {"latents": latents.to(dtype).contiguous(), "context": context.to(dtype).contiguous()}
    for name, t in out.items():
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{path}: `{name}` has NaN or Inf values")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.convert_diffsynth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="DiffSynth data_process output (searched recursively for *.pth)")
    p.add_argument("out", type=Path, help="flowstep dataset directory to write")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="stored precision (default bf16, as cached)")
    args = p.parse_args(argv)
    files = sorted(args.cache.rglob("*.pth"))
    if not files:
        print(f"error: no .pth files under {args.cache}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        for i, path in enumerate(files):
            sample = convert_sample(path, dtype)
            rel = path.relative_to(args.cache).with_suffix("")
            save_file(sample, str(args.out / f"{i:06d}-{'_'.join(rel.parts)}.safetensors"))
    except ModuleNotFoundError as e:
        # DiffSynth's cache pickles PIL images and other objects: unpickling imports their modules.
        print(missing_module(e, f"reading the DiffSynth cache ({path})"), file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {len(files)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
