"""tanh-GELU as one operator pair, for float32 exports that keep `com.flowstep` operators.

`flowstep::gelu_tanh(x) -> y` and `flowstep::gelu_tanh_grad(x, dy) -> dx` are `torch.library`
custom ops that the ONNX exporter maps to the `com.flowstep` nodes `GeluTanh` / `GeluTanhGrad`
(schemas registered below), which flowstep's executor implements on the CPU
(src/runtime/fused_gelu.rs): one pass over [tokens, ffn_dim] forward and one backward, where
pointwise.py's closed forms are 6 and ~13 standard nodes, each a full pass of memory
(issue 25: ~12 ms of a 334 ms AVX2 step at 1,280 tokens of `small`).

    y  = x·σ(v),  v = x·(c₀ + c₁x²)
    dx = dy·(σ + x·σ·(1 − σ)·(c₀ + 3c₁x²))

with c₀ = 2√(2/π), c₁ = 0.044715·c₀ (pointwise.py's GELU_C0, GELU_C1): 0.5·(1 + tanh(u)) =
σ(2u), so this is F.gelu(x, approximate="tanh"). float32 only: bfloat16 exports run on GPU
providers, which have no kernels for these nodes, and keep pointwise.py's standard-op form.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from .attention import DOMAIN
from .pointwise import GELU_C0, GELU_C1

# The ONNX operators of DOMAIN this module adds to a fused export.
OPERATORS = ("GeluTanh", "GeluTanhGrad")


@torch.library.custom_op("flowstep::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x * (GELU_C0 + GELU_C1 * (x * x)))


@gelu_tanh.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("flowstep::gelu_tanh_grad", mutates_args=())
def gelu_tanh_grad(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x * (GELU_C0 + GELU_C1 * (x * x)))
    return dy * (s + x * s * (1.0 - s) * (GELU_C0 + 3.0 * GELU_C1 * (x * x)))


@gelu_tanh_grad.register_fake
def _(x, dy):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return gelu_tanh_grad(x, dy)


gelu_tanh.register_autograd(_backward, setup_context=_setup_context)


def _register_schema(name: str, inputs: list[str], outputs: list[str]) -> None:
    if onnx.defs.has(name, DOMAIN):
        return
    onnx.defs.register_schema(OpSchema(
        name, DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, "T") for n in inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in outputs],
        type_constraints=[("T", ["tensor(float)"], "activations and their gradients")],
    ))


_register_schema("GeluTanh", ["x"], ["y"])
_register_schema("GeluTanhGrad", ["x", "dy"], ["dx"])
_flowstep = onnxscript.values.Opset(DOMAIN, 1)


def _translate_forward(x):
    return _flowstep.GeluTanh(x)


def _translate_backward(x, dy):
    return _flowstep.GeluTanhGrad(x, dy)


# For torch.onnx.export(custom_translation_table=...).
TRANSLATION_TABLE = {
    torch.ops.flowstep.gelu_tanh.default: _translate_forward,
    torch.ops.flowstep.gelu_tanh_grad.default: _translate_backward,
}
