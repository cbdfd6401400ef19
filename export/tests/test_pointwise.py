"""pointwise.py's hand-written backwards against PyTorch autograd through the stock ops
(F.layer_norm, Wan's RMSNorm formula, F.gelu(approximate="tanh")), evaluated in float64 so
the reference's own rounding is negligible: the float32 functions must agree to float32
precision (rtol 1e-5 on values of order 1)."""

import onnx
import pytest
import torch
import torch.nn.functional as F

from flowstep_export.model import pointwise
from flowstep_export.model.configs import get_config

from independent import TINY

TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(*shape, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3.0 + offset


def grads(fn, *tensors, dy):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward(dy)
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("offset", [0.0, 20.0])  # a large mean stresses the centred form
def test_layer_norm_matches_autograd(affine, offset):
    x, dy = inputs(2, 37, 64, offset=offset), inputs(2, 37, 64, seed=1)
    w, b = inputs(64, seed=2), inputs(64, seed=3)
    args = (x, w, b) if affine else (x,)
    ours, our_grads = grads(lambda x, *wb: pointwise.layer_norm(x, *(wb or (None, None)), 1e-6), *args, dy=dy)
    ref, ref_grads = grads(lambda x, *wb: F.layer_norm(x, (64,), *wb, eps=1e-6), *(t.double() for t in args), dy=dy.double())
    torch.testing.assert_close(ours.double(), ref, **TOL)
    for a, r in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), r, **TOL)


def test_rms_norm_matches_autograd():
    x, dy, w = inputs(3, 29, 48), inputs(3, 29, 48, seed=1), inputs(48, seed=2)

    def reference(x, w):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w

    ours, our_grads = grads(lambda x, w: pointwise.rms_norm(x, w, 1e-6), x, w, dy=dy)
    ref, ref_grads = grads(reference, x.double(), w.double(), dy=dy.double())
    torch.testing.assert_close(ours.double(), ref, **TOL)
    for a, r in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), r, **TOL)


def test_gelu_matches_autograd():
    x = torch.cat([inputs(4000), torch.linspace(-12, 12, 97)])  # saturated tails included
    dy = inputs(x.numel(), seed=1)
    ours, (dx,) = grads(pointwise.gelu_tanh, x, dy=dy)
    ref, (ref_dx,) = grads(lambda x: F.gelu(x, approximate="tanh"), x.double(), dy=dy.double())
    torch.testing.assert_close(ours.double(), ref, **TOL)
    torch.testing.assert_close(dx.double(), ref_dx, **TOL)


def test_frozen_weights_get_no_gradient_work():
    """LoRA freezes the norms' weights: their gradients must not be computed (None)."""
    x = inputs(5, 16).requires_grad_(True)
    w = inputs(16, seed=2)
    pointwise.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None


def test_bf16_inputs_keep_their_dtype():
    """bf16 in, bf16 out and bf16 gradient; both backwards compute in float32 and round once.
    LayerNorm's forward does too; GELU's runs in bf16 (a few roundings: a few bf16 ulps)."""
    x = inputs(7, 32).bfloat16()
    dy = inputs(7, 32, seed=1).bfloat16()
    for fn, forward_tol in ((lambda t: pointwise.layer_norm(t, None, None, 1e-6), 0.0), (pointwise.gelu_tanh, 2**-6)):
        out, (dx,) = grads(fn, x, dy=dy)
        ref, (ref_dx,) = grads(fn, x.float(), dy=dy.float())
        assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=forward_tol, atol=forward_tol)
        torch.testing.assert_close(dx, ref_dx.bfloat16(), rtol=0, atol=0)


def test_gelu_backward_recomputes_instead_of_keeping_the_forward():
    """Each block's GELU backward recomputes σ(v) with its own Sigmoid. Had CSE merged it with
    the forward's (it did, before the recompute used different nodes), the training graph
    would have the eval graph's Sigmoids only, and a [tokens, ffn_dim] tensor per block would
    stay alive from forward to backward."""
    def sigmoids(graph):
        return sum(n.op_type == "Sigmoid" for n in onnx.load(str(TINY / f"{graph}_model.onnx")).graph.node)

    assert sigmoids("training") == sigmoids("eval") + get_config("tiny").num_layers
