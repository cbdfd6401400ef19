"""Wan's LayerNorm, RMSNorm and tanh-GELU with hand-written backward passes.

Autograd's own backward of these traces to far more elementwise nodes than the math needs:
native_layer_norm_backward's decomposition re-derives x̂ and scales by N twice, RMSNorm's goes
through pow/mean/expand, and GELU's recomputes tanh with its own chain of ten constants. Each
node is a full pass over a [tokens, dim] (GELU: [tokens, ffn_dim]) tensor, on the CPU and on
the GPU alike. The backwards here are the textbook closed forms, in float32 (Wan and DiffSynth
normalise in float32; PyTorch's bf16 GELU backward kernel computes in float32):

    LayerNorm, y = x̂·w + b, x̂ = (x − μ)·r:   dx = r·(g − mean(g)) − (x − μ)·r³·mean(g·(x − μ)),  g = dy·w
    RMSNorm,   y = x·r·w,  r = 1/√(mean(x²) + ε):  dx = r·g − x·r³·mean(g·x),  g = dy·w
    GELU,      y = x·σ(v), v = x·(c₀ + c₁x²):      dx = dy·(σ + x·σ·(1 − σ)·(c₀ + 3c₁x²))

(0.5·(1 + tanh(u)) = σ(2u), so c₀ = 2√(2/π), c₁ = 0.044715·c₀.) Each saves only its input.
In a bf16 export the norms' backward cast of x to float32 is merged by CSE with the forward's,
so that float32 copy lives until the backward, as it did with autograd's own backward; GELU's
forward runs in x's dtype, so its backward cast stays separate. Gradients of the norms' own
weights are computed only when asked for (LoRA leaves them frozen).
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to `like`'s shape and dtype."""
    return t.sum(dim=tuple(range(t.dim() - 1))).reshape(like.shape).to(like.dtype)


def layer_norm_input_grad(x32: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerNorm's dx (float32) from g = dy·w and the forward's mean and rstd."""
    centred = x32 - mean
    mean_g = g.mean(dim=-1, keepdim=True)
    mean_gc = (g * centred).mean(dim=-1, keepdim=True)
    return (g - mean_g) * rstd - centred * (rstd * rstd * rstd * mean_gc)


def rms_norm_input_grad(x32: torch.Tensor, g: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """RMSNorm's dx (float32) from g = dy·w and the forward's rstd."""
    mean_gx = (g * x32).mean(dim=-1, keepdim=True)
    return g * rstd - x32 * (rstd * rstd * rstd * mean_gx)


def gelu_tanh_input_grad(x32: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """tanh-GELU's dx (float32) from its input and dy."""
    # σ(v) is recomputed from x with nodes that differ from the forward's (c₁x·x, not
    # c₁·x²): common-subexpression elimination would otherwise merge the two and keep
    # σ(v), a [tokens, ffn_dim] float32 tensor per block, alive from forward to backward.
    c1x2 = (x32 * GELU_C1) * x32
    s = torch.sigmoid(x32 * (c1x2 + GELU_C0))
    ds = s * (1.0 - s)
    return dy.float() * (s + x32 * ds * (c1x2 * 3.0 + GELU_C0))


class LayerNormFunction(torch.autograd.Function):
    """layer_norm over the last dim in float32 (optional float32 weight and bias), result in x's
    dtype; the forward stays one native_layer_norm (ONNX LayerNormalization)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        out, mean, rstd = aten.native_layer_norm(x.float(), [x.shape[-1]], w, b, eps)
        return out.to(x.dtype), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dy = dy.float()
        g = dy if weight is None else dy * weight.float()
        dx = layer_norm_input_grad(x.float(), mean, rstd, g)
        dweight = dbias = None
        if ctx.needs_input_grad[1]:
            dweight = _sum_to(dy * ((x.float() - mean) * rstd), weight)
        if ctx.needs_input_grad[2]:
            dbias = _sum_to(dy, bias)
        return dx.to(x.dtype), dweight, dbias, None


class RMSNormFunction(torch.autograd.Function):
    """Wan's RMSNorm: (x·r in float32, cast to x's dtype)·weight, r = rsqrt(mean(x²) + eps)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
        x32 = x.float()
        rstd = torch.rsqrt((x32 * x32).mean(dim=-1, keepdim=True) + eps)
        return (x32 * rstd).to(x.dtype) * weight, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        dx = rms_norm_input_grad(x32, (dy * weight).float(), rstd)
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = _sum_to(dy * (x32 * rstd).to(x.dtype), weight)
        return dx.to(x.dtype), dweight, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return LayerNormFunction.apply(x, weight, bias, eps)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)[0]


GELU_C0 = 2.0 * math.sqrt(2.0 / math.pi)
GELU_C1 = 0.044715 * GELU_C0


class GeluTanhFunction(torch.autograd.Function):
    """F.gelu(x, approximate="tanh"): forward in x's dtype, backward in float32."""

    @staticmethod
    def forward(x: torch.Tensor):
        # No float32 copy of x here: the backward's cast would be merged with it by CSE and
        # kept alive from forward to backward ([tokens, ffn_dim] per block).
        return x * torch.sigmoid(x * (GELU_C0 + GELU_C1 * (x * x)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_tanh_input_grad(x.float(), dy).to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return GeluTanhFunction.apply(x)
