"""float8_e4m3fn base weights (docs/DESIGN.md §3.2, §3.6): the Linear weights of the blocks
stored in fp8 with a float32 scale per tensor or per block of 64 inputs, dequantized inside the
graph to the compute dtype.

The layout is ComfyUI's (`M.weight` in F8_E4M3 beside `M.scale_weight`) and musubi-tuner's
block-wise `fp8_scaled` ([out, in/64, 1] scales); the quantization is musubi's
(`fp8_optimization_utils.quantize_weight`): scale = max|w| / 448 over the tensor or block
(at least 1e-8), w / scale clamped to ±448 and rounded to e4m3fn. Dequantization is theirs
too: `weight.to(dtype) * scale.to(dtype)`.

`python -m flowstep_export.model.fp8 IN.safetensors OUT.safetensors [--scale tensor|block]` converts
a bf16/f32 Wan checkpoint into such a file (ComfyUI's `*_fp8_scaled` layout with per-tensor
scales, musubi's with block scales), which flowstep then reads as --base.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BASE_DTYPES = ("float8_e4m3fn",)
SCALES = ("tensor", "block")
BLOCK_SIZE = 64  # musubi's default block
SCALE_SUFFIX = ".scale_weight"


def is_quantized(name: str, shape) -> bool:
    """musubi's targets for Wan: the 2-D weights inside the blocks (every Linear of attention and
    FFN; norms, modulation, embeddings and head stay in the compute dtype)."""
    return name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2


def scale_name(weight: str) -> str:
    return weight.removesuffix(".weight") + SCALE_SUFFIX


def quantize(weight: torch.Tensor, scale: str, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """musubi's quantize_weight: (fp8 weight, float32 scale [1] or [out, in/block, 1])."""
    w = weight.detach().float()
    if scale == "block":
        out, inputs = w.shape
        if inputs % block_size:
            raise ValueError(f"a weight of shape {list(w.shape)} has {inputs} inputs, not a multiple of the "
                             f"fp8 block of {block_size}: use --fp8-scale tensor")
        w = w.reshape(out, inputs // block_size, block_size)
        s = w.abs().amax(dim=2, keepdim=True) / FP8_MAX
    elif scale == "tensor":
        s = (w.abs().max() / FP8_MAX).reshape(1)
    else:
        raise ValueError(f"unknown fp8 scale {scale!r}; choose one of {', '.join(SCALES)}")
    s = s.clamp(min=1e-8)
    q = (w / s).nan_to_num(0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(weight.shape), s


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's and musubi's dequantization, `weight.to(dtype) * scale.to(dtype)`, per block
    when the scale is [out, blocks, 1]."""
    w = weight.to(dtype)
    if scale.dim() == 3:
        out, blocks, _ = scale.shape
        return (w.reshape(out, blocks, -1) * scale.to(dtype)).reshape(weight.shape)
    return w * scale.to(dtype)


class Fp8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with W dequantized from fp8 in the forward and again in the backward, so that no
    dequantized weight stays alive from one to the other: at peak only the fp8 weights are
    resident (the export turns off CSE for these graphs so that the two stay apart)."""

    @staticmethod
    def forward(x, weight, scale):
        return F.linear(x, dequantize(weight, scale, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, scale = inputs
        ctx.save_for_backward(weight, scale)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad @ dequantize(weight, scale, grad.dtype), None, None


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear's base product, fp8 weights dequantized; the PyTorch reference (model.POINTWISE
    "stock") lets autograd keep the dequantized weight instead of recomputing it."""
    if layer.weight.dtype != FP8:
        return F.linear(x, layer.weight, layer.bias)
    from . import model

    if model.POINTWISE == "stock":
        y = F.linear(x, dequantize(layer.weight, layer.scale_weight, x.dtype))
    else:
        y = Fp8LinearFunction.apply(x, layer.weight, layer.scale_weight)
    return y if layer.bias is None else y + layer.bias


class Fp8Linear(nn.Linear):
    """A Linear of the base whose weight is fp8 (one that carries no LoRA)."""

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x)


def quantize_model(model: nn.Module, scale: str, lora_names: list[str]) -> None:
    """Replace every targeted base weight by its fp8 value and add its float32 `scale_weight`
    parameter beside it (graph inputs in the manifest's order: weight, bias, scale_weight)."""
    lora_modules = {n.split(".lora_")[0] for n in lora_names}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not is_quantized(f"{name}.weight", module.weight.shape) or ".lora_" in name:
            continue
        q, s = quantize(module.weight, scale)
        if name not in lora_modules:
            parent_name, _, child = name.rpartition(".")
            replacement = Fp8Linear(module)
            setattr(model.get_submodule(parent_name), child, replacement)
            module = replacement
        module.weight = nn.Parameter(q, requires_grad=False)
        module.scale_weight = nn.Parameter(s, requires_grad=False)


def quantize_state(state: dict[str, torch.Tensor], scale: str) -> dict[str, torch.Tensor]:
    """A Wan state dict with its block weights in fp8 and their scales: ComfyUI's fp8_scaled
    layout (0-d scales and the `scaled_fp8` marker) for per-tensor scales, musubi's for blocks."""
    out = {}
    for name, value in state.items():
        if not is_quantized(name, value.shape):
            out[name] = value
            continue
        q, s = quantize(value, scale)
        out[name] = q
        out[scale_name(name)] = s.reshape(()) if scale == "tensor" else s
    if scale == "tensor":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8 weights of a ComfyUI or musubi file as float32 (`fp8 · scale`; scale 1 in a plain
    `*_fp8_e4m3fn` file); scales and markers dropped. A scaled file missing a scale is an error."""
    scaled = any(k.endswith(SCALE_SUFFIX) for k in state)
    out = {}
    for name, value in state.items():
        if name.endswith(SCALE_SUFFIX) or name.endswith("scaled_fp8") or name.endswith(".scale_input"):
            continue
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            key = scale_name(name)
            if key in state:
                value = dequantize(value, state[key].float(), torch.float32)
            elif scaled:
                raise ValueError(f"missing `{key}`, the scale of fp8 weight `{name}` (the file has other scales)")
            else:
                value = value.float()
        out[name] = value
    return out


def main(argv=None) -> int:
    from safetensors.torch import load_file, save_file

    from ..deps import run_reporting_errors

    p = argparse.ArgumentParser(prog="python -m flowstep_export.model.fp8",
                                description="Convert a bf16/f32 Wan checkpoint to fp8 (float8_e4m3fn) base weights "
                                            "with scales, for an export made with --base-dtype float8_e4m3fn.")
    p.add_argument("checkpoint", type=Path, help="Wan checkpoint (.safetensors, Wan/DiffSynth keys)")
    p.add_argument("out", type=Path, help="fp8 checkpoint to write")
    p.add_argument("--scale", choices=SCALES, default="tensor",
                   help="tensor: one scale per weight (ComfyUI's *_fp8_scaled layout); block: one per 64 inputs "
                        "of each row (musubi-tuner's fp8_scaled) (default: tensor)")
    args = p.parse_args(argv)

    def run() -> None:
        if not args.checkpoint.is_file():
            raise ValueError(f"{args.checkpoint}: no such file")
        state = load_file(str(args.checkpoint))
        fp8 = sorted(k for k, v in state.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
        if fp8:
            raise ValueError(f"{args.checkpoint}: already holds fp8 tensors (e.g. `{fp8[0]}`); pass it to flowstep as it is")
        prefix = "model." if "model.head.head.weight" in state and "head.head.weight" not in state else ""
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in quantize_state(state, args.scale).items()}, str(args.out))

    return run_reporting_errors("python -m flowstep_export.model.fp8", run)[0]


if __name__ == "__main__":
    raise SystemExit(main())
