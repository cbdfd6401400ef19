"""tanh-GELU, RMSNorm, LayerNorm's backward and RoPE as operators, for float32 exports that keep `com.flowstep`
operators.

`torch.library` custom ops that the ONNX exporter maps to `com.flowstep` nodes (schemas
registered below), which flowstep's executor implements on the CPU (src/runtime/fused_pointwise.rs):
one pass over memory forward and one backward, where pointwise.py's closed forms are chains of
standard nodes, each a full pass (issue 25: GELU ~12 ms, the RMSNorms ~8 ms and RoPE ~5 ms of a
334 ms AVX2 step at 1,280 tokens of `small`).

`GeluTanh(x) -> y`, `GeluTanhGrad(x, dy) -> dx` (6 and ~13 standard nodes):

    y  = x·σ(v),  v = x·(c₀ + c₁x²)
    dx = dy·(σ + x·σ·(1 − σ)·(c₀ + 3c₁x²))

with c₀ = 2√(2/π), c₁ = 0.044715·c₀ (pointwise.py's GELU_C0, GELU_C1): 0.5·(1 + tanh(u)) =
σ(2u), so this is F.gelu(x, approximate="tanh").

`RmsNorm(x, weight) -> (y, rstd)` (attribute `epsilon`) and `RmsNormGrad(x, weight, rstd, dy)
-> dx`, over the last axis (Wan's q/k norms; 6 and ~9 standard nodes):

    rstd = 1/√(mean(x²) + ε) (shape [..., 1]),  y = (x·rstd)·w
    dx = g·rstd − x·rstd³·mean(g·x),  g = dy·w

The norm weight gets no gradient (LoRA leaves it frozen; asking for one is an error).

`LayerNormGrad(x, mean, rstd, dy, weight) -> dx`: LayerNorm's input gradient over the last axis
(Wan's norm1/norm2/norm3 and the head's; their forward stays ONNX LayerNormalization, whose
mean and rstd [..., 1] it takes; ~9 standard nodes):

    dx = (g − mean(g))·rstd − (x − mean)·rstd³·mean(g·(x − mean)),  g = dy·w

(w is ones for a norm without affine weights; weights and biases get no gradient.)

`Rope(x, cos, sin) -> y`: Wan's RoPE on interleaved (real, imaginary) pairs of x [B, S, C]
with cos, sin [S, 1, P] per token and pair (C a multiple of 2P; the heads share the tables):

    y[2p] = x[2p]·cos − x[2p+1]·sin,  y[2p+1] = x[2p]·sin + x[2p+1]·cos

Its gradient is the inverse rotation, the same operator with −sin (the tables are constants:
asking for their gradient is an error). The standard-op form is 10 nodes each way (unbind,
four products, two sums, stack).

float32 only: bfloat16 exports run on GPU providers, which have no kernels for these nodes,
and keep pointwise.py's standard-op forms.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from .attention import DOMAIN
from . import pointwise

# The ONNX operators of DOMAIN this module adds to a fused export.
OPERATORS = ("GeluTanh", "GeluTanhGrad", "RmsNorm", "RmsNormGrad", "LayerNormGrad", "Rope")


@torch.library.custom_op("flowstep::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return pointwise.GeluTanhFunction.forward(x)


@gelu_tanh.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("flowstep::gelu_tanh_grad", mutates_args=())
def gelu_tanh_grad(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return pointwise.gelu_tanh_input_grad(x, dy)


@gelu_tanh_grad.register_fake
def _(x, dy):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return gelu_tanh_grad(x, dy)


gelu_tanh.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("flowstep::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return pointwise.RMSNormFunction.forward(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1))


@torch.library.custom_op("flowstep::rms_norm_grad", mutates_args=())
def rms_norm_grad(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return pointwise.rms_norm_input_grad(x, dy * weight, rstd)


@rms_norm_grad.register_fake
def _(x, weight, rstd, dy):
    return torch.empty_like(x)


def _rms_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dy, _drstd):
    if ctx.needs_input_grad[1]:
        raise NotImplementedError("flowstep::rms_norm computes no gradient for its weight (frozen under LoRA)")
    x, weight, rstd = ctx.saved_tensors
    return rms_norm_grad(x, weight, rstd, dy), None, None


rms_norm.register_autograd(_rms_backward, setup_context=_rms_setup_context)


@torch.library.custom_op("flowstep::layer_norm_grad", mutates_args=())
def layer_norm_grad(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    return pointwise.layer_norm_input_grad(x, mean, rstd, dy * weight)


@layer_norm_grad.register_fake
def _(x, mean, rstd, dy, weight):
    return torch.empty_like(x)


class LayerNormFunction(pointwise.LayerNormFunction):
    """pointwise.LayerNormFunction (one native_layer_norm forward, ONNX LayerNormalization) with
    the flowstep::layer_norm_grad operator as its backward; float32."""

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise NotImplementedError("flowstep::layer_norm_grad computes no gradient for the norm's weight or bias (frozen under LoRA)")
        x, weight, _, mean, rstd = ctx.saved_tensors
        weight = x.new_ones(x.shape[-1]) if weight is None else weight
        return layer_norm_grad(x, mean, rstd, dy, weight), None, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.layer_norm(x, [D], weight, bias, eps) with the fused backward."""
    return LayerNormFunction.apply(x, weight, bias, eps)[0]


@torch.library.custom_op("flowstep::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    pairs = x.reshape(b, s, -1, cos.shape[-1], 2)
    re, im = pairs.unbind(-1)
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).reshape(x.shape)


@rope.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


def _rope_setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dy):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise NotImplementedError("flowstep::rope computes no gradient for its cos/sin tables (constants)")
    cos, sin = ctx.saved_tensors
    return rope(dy, cos, -sin), None, None


rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def _register_schema(name: str, inputs: list[str], outputs: list[str], attributes: tuple = ()) -> None:
    if onnx.defs.has(name, DOMAIN):
        return
    onnx.defs.register_schema(OpSchema(
        name, DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, "T") for n in inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in outputs],
        type_constraints=[("T", ["tensor(float)"], "activations, weights and their gradients")],
        attributes=list(attributes),
    ))


_EPSILON = (OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "added to mean(x²) before the square root"),)
_register_schema("GeluTanh", ["x"], ["y"])
_register_schema("GeluTanhGrad", ["x", "dy"], ["dx"])
_register_schema("RmsNorm", ["x", "weight"], ["y", "rstd"], _EPSILON)
_register_schema("RmsNormGrad", ["x", "weight", "rstd", "dy"], ["dx"])
_register_schema("LayerNormGrad", ["x", "mean", "rstd", "dy", "weight"], ["dx"])
_register_schema("Rope", ["x", "cos", "sin"], ["y"])
_flowstep = onnxscript.values.Opset(DOMAIN, 1)


def _translate_gelu(x):
    return _flowstep.GeluTanh(x)


def _translate_gelu_grad(x, dy):
    return _flowstep.GeluTanhGrad(x, dy)


def _translate_rms_norm(x, weight, eps: float):
    return _flowstep.RmsNorm(x, weight, epsilon=eps, _outputs=2)


def _translate_rms_norm_grad(x, weight, rstd, dy):
    return _flowstep.RmsNormGrad(x, weight, rstd, dy)


def _translate_layer_norm_grad(x, mean, rstd, dy, weight):
    return _flowstep.LayerNormGrad(x, mean, rstd, dy, weight)


def _translate_rope(x, cos, sin):
    return _flowstep.Rope(x, cos, sin)


# For torch.onnx.export(custom_translation_table=...).
TRANSLATION_TABLE = {
    torch.ops.flowstep.rope.default: _translate_rope,
    torch.ops.flowstep.layer_norm_grad.default: _translate_layer_norm_grad,
    torch.ops.flowstep.gelu_tanh.default: _translate_gelu,
    torch.ops.flowstep.gelu_tanh_grad.default: _translate_gelu_grad,
    torch.ops.flowstep.rms_norm.default: _translate_rms_norm,
    torch.ops.flowstep.rms_norm_grad.default: _translate_rms_norm_grad,
}
