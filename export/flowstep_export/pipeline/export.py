"""Export a Wan DiT + LoRA into an artifacts directory (docs/DESIGN.md §3)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save_file

from .. import DEFAULT_ATTENTION_CHUNK, FP8_OPSET, OPSET
from . import trace
from ..model import fp8
from ..model.attention import DOMAIN, OPERATORS
from ..model.configs import WanConfig
from ..model.lora import SCALE, LoraConfig, base_state, inject_lora, lora_state
from .manifest import write_manifest
from ..model import model as wan
from ..model.model import WanModel, init_random, rope_tables
from .steps import StepFunctions, adamw, flat_layout, flatten

log = logging.getLogger("flowstep_export")

TRAINING_OUTPUTS = ["loss", "grad_accum_out"]
OPTIMIZER_INPUTS = ["params", "grads", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay",
                    "bias_correction1", "bias_correction2", "grad_scale"]
OPTIMIZER_OUTPUTS = ["params_out", "m_out", "v_out", "grad_norm", "params_nonfinite"]
LATENT_AXES = {2: "frames", 3: "height", 4: "width"}
PRECISIONS = {"float32": (torch.float32, onnx.TensorProto.FLOAT), "bfloat16": (torch.bfloat16, onnx.TensorProto.BFLOAT16)}


@dataclasses.dataclass
class ExportOptions:
    out: Path
    base: Path | None = None
    seed: int = 0
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    ship_base: bool = False  # copy the base weights into the artifacts (toy models)
    graphs: tuple[str, ...] = ("training_model", "eval_model", "optimizer_model", "inference_model")
    # Queries per attention chunk: the largest attention tensor is [heads, chunk, tokens].
    attention_chunk: int = DEFAULT_ATTENTION_CHUNK
    # DiffSynth's use_gradient_checkpointing: recompute each block's forward in the backward.
    gradient_checkpointing: bool = False
    precision: str = "float32"  # or "bfloat16": base weights and activations; LoRA, loss and AdamW stay float32
    # "chunked": standard-op Scan (any provider); "fused": com.flowstep operators the executor implements.
    attention: str = "chunked"
    # Wan2.2 A14B: which expert of the pair ("high_noise" or "low_noise"); recorded in the manifest.
    expert: str | None = None
    # Base weights uninitialised and never read (the pages are never touched): the graphs hold
    # no weights, so a model too large for this machine's memory still exports; nothing can
    # be validated.
    shapes_only: bool = False
    # "float8_e4m3fn": the blocks' Linear weights are fp8 graph inputs with float32 scales per
    # tensor or per block (`fp8_scale`), dequantized in the graph to `precision` (fp8.py).
    base_dtype: str | None = None
    fp8_scale: str = "tensor"

    @property
    def lowering(self) -> trace.Lowering:
        # fp8 inputs need opset 19 (Cast from float8); CSE would merge the backward's
        # dequantization with the forward's and keep every dequantized weight alive between them.
        fp8_base = self.base_dtype is not None
        return trace.Lowering(self.attention_chunk, PRECISIONS[self.precision][1], attention=self.attention,
                              opset=FP8_OPSET if fp8_base else OPSET, cse=not fp8_base)

    @property
    def fused_pointwise(self) -> bool:
        """The com.flowstep pointwise operators (pointwise_operators.py): in fused float32 exports,
        which run on the CPU, the only provider with kernels for them."""
        return self.attention == "fused" and self.precision == "float32"

    @property
    def attention_manifest(self) -> dict:
        """manifest.training.attention: what the executor must provide to run the graphs."""
        if self.attention == "fused":
            return {"impl": "fused", "domain": DOMAIN, "operators": list(OPERATORS)}
        return {"impl": "chunked", "chunk": self.attention_chunk}

    @property
    def ort_disabled_optimizers(self) -> list[str]:
        """ONNX Runtime optimizers the executor must turn off: CSE would merge checkpointing's
        recompute with the forward (docs/DESIGN.md §6a), and an fp8 base's dequantization in the
        backward with the forward's."""
        return ["CommonSubexpressionElimination"] if self.gradient_checkpointing or self.base_dtype else []

    @property
    def fp8_manifest(self) -> dict | None:
        """manifest.training.fp8: how the fp8 base weights are scaled (informational)."""
        if self.base_dtype is None:
            return None
        return {"dtype": self.base_dtype, "scale": self.fp8_scale, "block_size": fp8.BLOCK_SIZE if self.fp8_scale == "block" else None}


def load_base_weights(model: WanModel, path: Path) -> None:
    """Load a Wan/DiffSynth checkpoint; a leading `model.` is stripped. Every model tensor
    must be present with its shape; extra tensors (other variants' heads) are listed."""
    state = fp8.dequantize_state(load_file(str(path)))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: tensor {key} has shape {list(state[key].shape)}, the config needs {list(value.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        log.warning("%s: ignoring %d tensors not in this config, e.g. %s", path, len(extra), extra[:3])
    model.load_state_dict({k: state[k].float() for k in expected})


def build_model(config: WanConfig, options: ExportOptions) -> tuple[WanModel, list[str]]:
    if options.shapes_only:
        if options.base is not None or options.ship_base:
            raise ValueError("--shapes-only exports without weights: not with --base or --ship-base")
        with torch.device("meta"):
            model = WanModel(config)
        model.rope = rope_tables(config.head_dim)  # constants of the graph: real tensors
    else:
        model = WanModel(config)
    if options.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.attention not in trace.ATTENTION_MODES:
        raise ValueError(f"unknown attention {options.attention!r}; choose one of {', '.join(trace.ATTENTION_MODES)}")
    if options.base_dtype not in (None, *fp8.BASE_DTYPES):
        raise ValueError(f"unknown base dtype {options.base_dtype!r}; choose one of {', '.join(fp8.BASE_DTYPES)}")
    if options.fp8_scale not in fp8.SCALES:
        raise ValueError(f"unknown fp8 scale {options.fp8_scale!r}; choose one of {', '.join(fp8.SCALES)}")
    if options.base is not None:
        load_base_weights(model, options.base)
    elif options.shapes_only:
        log.warning("--shapes-only: %s is traced with uninitialised base weights", config.name)
    else:
        log.warning("no --base given: %s is initialised randomly (seed %d)", config.name, options.seed)
        init_random(model, options.seed)
    lora_names = inject_lora(model, options.lora, seed=options.seed)
    if options.base_dtype is not None:
        fp8.quantize_model(model, options.fp8_scale, lora_names)
    model.eval()
    model.gradient_checkpointing = options.gradient_checkpointing
    dtype = PRECISIONS[options.precision][0]
    if options.shapes_only:  # meta parameters become CPU ones whose memory is never touched
        for module in model.modules():
            for pname, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    kept = p.dtype == fp8.FP8 or pname == "scale_weight"
                    module._parameters[pname] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype if kept else dtype), requires_grad=False)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        # fp8 weights and their float32 scales stay as they are
        if name not in lora_names and p.dtype != fp8.FP8 and not name.endswith(fp8.SCALE_SUFFIX):
            p.data = p.data.to(dtype)
    return model, lora_names


def example_inputs(config: WanConfig, seed: int, latent: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    frames, height, width = latent or config.example_latent
    g = torch.Generator().manual_seed(seed + 1)
    batch = {
        "x_t": torch.randn((1, config.out_dim, frames, height, width), generator=g),
        "timestep": torch.tensor([937.5]),
        "context": torch.randn((1, config.text_len, config.text_dim), generator=g),
        "target": torch.randn((1, config.out_dim, frames, height, width), generator=g),
        "weight": torch.tensor(0.75),
    }
    sizes = {"frames": frames, "height": height, "width": width}
    for name, shape in config.conditioning:
        batch[name] = torch.randn((1, *(sizes.get(d, d) for d in shape)), generator=g)
    return batch


def dynamic_axes(config: WanConfig, name: str) -> dict[int, str]:
    """The symbolic latent axes of a batch input (graph axis -> contract name)."""
    if name in ("x_t", "target"):
        return LATENT_AXES
    shape = dict(config.conditioning).get(name, ())
    return {axis + 1: d for axis, d in enumerate(shape) if isinstance(d, str)}


def export_artifacts(config: WanConfig, options: ExportOptions) -> dict:
    """Build, trace and export every graph; returns the manifest."""
    out = options.out
    expert = config.expert_manifest(options.expert)  # before any work: a missing --expert is an error
    out.mkdir(parents=True, exist_ok=True)
    model, lora_names = build_model(config, options)
    lora = lora_state(model)
    base = base_state(model)
    layout = flat_layout(lora, lora_names)
    base_names = list(base)
    fns = StepFunctions(model, layout, base_names)
    flat = flatten(lora, layout)
    batch = example_inputs(config, options.seed)

    def base_inputs():
        # The parameters themselves: distinct tensors (torch.export merges aliased inputs),
        # and no copy of a multi-GB model.
        return [trace.GraphInput(name, base[name]) for name in base_names]

    def batch_inputs(names):
        return [trace.GraphInput(n, batch[n].clone(), dynamic_axes(config, n)) for n in names]

    conditioning = [name for name, _ in config.conditioning]
    loss_inputs = ["x_t", "timestep", "context", "target", "weight", *conditioning]
    def lora_inputs(*vectors):
        # The flat LoRA vectors, then the scale alpha/rank, which the executor feeds per run.
        scale = torch.tensor(options.lora.scaling, dtype=torch.float32)
        return [trace.GraphInput(name, flat.clone()) for name in vectors] + [trace.GraphInput(SCALE, scale)]

    specs = {
        "training_model": lambda: (fns.training, lora_inputs("lora_params", "grad_accum") + base_inputs() + batch_inputs(loss_inputs), TRAINING_OUTPUTS),
        "eval_model": lambda: (fns.eval, lora_inputs("lora_params") + base_inputs() + batch_inputs(loss_inputs), ["loss"]),
        "inference_model": lambda: (fns.inference, lora_inputs("lora_params") + base_inputs()
                                    + batch_inputs(["x_t", "timestep", "context", *conditioning]), ["velocity"]),
        "optimizer_model": lambda: (adamw, optimizer_inputs(flat.numel()), OPTIMIZER_OUTPUTS),
    }
    timings, operators = {}, set()
    saved, wan.POINTWISE = wan.POINTWISE, "fused" if options.fused_pointwise else wan.POINTWISE
    try:
        for name in options.graphs:
            start = time.perf_counter()
            fn, inputs, outputs = specs[name]()
            gm = trace.trace(fn, inputs)
            model_proto = trace.export(gm, inputs, outputs, options.lowering)
            onnx.save(model_proto, str(out / f"{name}.onnx"))
            operators |= {n.op_type for n in model_proto.graph.node if n.domain == DOMAIN}
            timings[name] = round(time.perf_counter() - start, 2)
            log.info("exported %s in %.1f s (%d nodes)", name, timings[name], len(model_proto.graph.node))
    finally:
        wan.POINTWISE = saved

    save_file({t.key: lora[t.key].contiguous() for t in layout}, str(out / "lora_init.safetensors"))
    base_file = None
    if options.ship_base:
        base_file = "base.safetensors"
        save_file({k: v.contiguous() for k, v in base.items()}, str(out / base_file))
    manifest = write_manifest(out, config, options.lora, layout, base, base_file, list(options.graphs), expert,
                              extra={"export_seconds": timings, "base_source": str(options.base) if options.base else None},
                              training={"precision": options.precision,
                                        "attention": options.attention_manifest,
                                        # Every com.flowstep operator the graphs use (fused exports): the executor
                                        # must implement each.
                                        **({"operators": sorted(operators)} if operators else {}),
                                        "gradient_checkpointing": options.gradient_checkpointing,
                                        "onnxruntime_disabled_optimizers": options.ort_disabled_optimizers,
                                        **({"fp8": options.fp8_manifest} if options.base_dtype else {})},
                              opset=options.lowering.opset)
    return manifest


def optimizer_inputs(num_params: int) -> list[trace.GraphInput]:
    g = torch.Generator().manual_seed(7)
    vectors = [trace.GraphInput(n, torch.randn(num_params, generator=g)) for n in ("params", "grads", "m")]
    vectors.append(trace.GraphInput("v", torch.rand(num_params, generator=g)))
    scalars = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
               "bias_correction1": 0.1, "bias_correction2": 0.001, "grad_scale": 1.0}
    return vectors + [trace.GraphInput(n, torch.tensor(v, dtype=torch.float32)) for n, v in scalars.items()]
