"""Attention as one operator pair whose backward recomputes the probabilities.

`flowstep::flash_attention(q, k, v, scale) -> (o, lse)` and
`flowstep::flash_attention_grad(q, k, v, o, lse, do, scale) -> (dq, dk, dv)` are
`torch.library` custom ops: `make_fx` keeps them opaque, autograd pairs them, and the ONNX
exporter maps them to the `com.flowstep` nodes `FlashAttention` / `FlashAttentionGrad`
(schemas registered below). Only `o` and the float32 log-sum-exp `lse` are kept for the
backward, so nothing of size [heads, Sq, Sk] outlives one step of the computation.
`lower_attention.py` then replaces those nodes by standard ONNX ops that process the queries
in chunks (FlashAttention's recompute in plain ops).

Layout is Wan's: q [B, Sq, H, D], k and v [B, Sk, H, D], o like q, lse [B, H, Sq] float32.
The eager implementations here exist for shape propagation and tests; the export's
validation compares the exported graph with plain softmax attention, not with these.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

DOMAIN = "com.flowstep"
# The ONNX operators of DOMAIN, as a fused export keeps them (trace.Lowering.attention).
OPERATORS = ("FlashAttention", "FlashAttentionGrad")


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 [B, H, Sq, Sk] scores, as flash kernels form them from bf16 inputs."""
    return torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale


@torch.library.custom_op("flowstep::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = _scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.float())
    return o.to(q.dtype), lse


@flash_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("flowstep::flash_attention_grad", mutates_args=())
def flash_attention_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                         do: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = torch.exp(_scores(q, k, scale) - lse[..., None])
    do32 = do.float()
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do32)
    dp = torch.einsum("bqhd,bkhd->bhqk", do32, v.float())
    delta = (do32 * o.float()).sum(-1).transpose(1, 2)  # rowsum(dO ∘ O): [B, H, Sq]
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.float()) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@flash_attention_grad.register_fake
def _(q, k, v, o, lse, do, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_grad(q, k, v, o, lse, do, ctx.scale)
    return dq, dk, dv, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


def _register_schema(name: str, inputs: list[str], outputs: list[str]) -> None:
    if onnx.defs.has(name, DOMAIN):
        return
    typ = lambda n: "L" if n == "lse" else "T"  # noqa: E731
    onnx.defs.register_schema(OpSchema(
        name, DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(n, typ(n)) for n in inputs],
        outputs=[OpSchema.FormalParameter(n, typ(n)) for n in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"], "q, k, v and their gradients"),
                          ("L", ["tensor(float)"], "log-sum-exp of each query's scores")],
        attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "multiplies q·kᵀ before the softmax")],
    ))


_register_schema("FlashAttention", ["q", "k", "v"], ["o", "lse"])
_register_schema("FlashAttentionGrad", ["q", "k", "v", "o", "lse", "do"], ["dq", "dk", "dv"])
_flowstep = onnxscript.values.Opset(DOMAIN, 1)


def _translate_forward(q, k, v, scale: float):
    return _flowstep.FlashAttention(q, k, v, scale=scale, _outputs=2)


def _translate_backward(q, k, v, o, lse, do, scale: float):
    return _flowstep.FlashAttentionGrad(q, k, v, o, lse, do, scale=scale, _outputs=3)


# For torch.onnx.export(custom_translation_table=...).
TRANSLATION_TABLE = {
    torch.ops.flowstep.flash_attention.default: _translate_forward,
    torch.ops.flowstep.flash_attention_grad.default: _translate_backward,
}
