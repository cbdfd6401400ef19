"""NumPy implementations of the com.flowstep operators (attention, tanh-GELU, RMSNorm, LayerNorm's backward, RoPE) for ONNX's reference
evaluator, so a fused export (`--attention fused`) validates on the CPU without any
operator library: `ReferenceEvaluator(path, new_ops=NEW_OPS)`.

Written from the operator definitions (attention.py's docstring), not from the PyTorch
eager code, and checked against PyTorch autograd through plain softmax attention by the
export's validation. Statistics and accumulators are float32, inputs of any float dtype
(bf16 via ml_dtypes) are widened first, outputs take the inputs' dtype: as the kernels do.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from ..model.attention import DOMAIN


def _heads_first(x: np.ndarray) -> np.ndarray:
    """[B, S, H, D] in any float dtype -> float32 [B, H, S, D]."""
    return np.ascontiguousarray(x.astype(np.float32).transpose(0, 2, 1, 3))


def _probs(q: np.ndarray, k: np.ndarray, lse: np.ndarray, scale: float) -> np.ndarray:
    return np.exp(np.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(scale) - lse[..., None])


class FlashAttention(OpRun):
    op_domain = DOMAIN

    def _run(self, q, k, v, scale=None):
        qh, kh, vh = (_heads_first(x) for x in (q, k, v))
        s = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * np.float32(scale)
        row_max = s.max(-1, keepdims=True)
        lse = (row_max + np.log(np.exp(s - row_max).sum(-1, keepdims=True)))[..., 0]
        o = np.matmul(_probs(qh, kh, lse, scale), vh)
        return o.transpose(0, 2, 1, 3).astype(q.dtype), lse.astype(np.float32)


class FlashAttentionGrad(OpRun):
    op_domain = DOMAIN

    def _run(self, q, k, v, o, lse, do, scale=None):
        qh, kh, vh, oh, doh = (_heads_first(x) for x in (q, k, v, o, do))
        p = _probs(qh, kh, lse.astype(np.float32), scale)
        dv = np.matmul(p.transpose(0, 1, 3, 2), doh)
        delta = (doh * oh).sum(-1, keepdims=True)  # rowsum(dO ∘ O)
        ds = p * (np.matmul(doh, vh.transpose(0, 1, 3, 2)) - delta) * np.float32(scale)
        dq = np.matmul(ds, kh)
        dk = np.matmul(ds.transpose(0, 1, 3, 2), qh)
        back = lambda x, like: x.transpose(0, 2, 1, 3).astype(like.dtype)  # noqa: E731
        return back(dq, q), back(dk, k), back(dv, v)


# tanh-GELU (pointwise_operators.py), from its definition 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715x³))),
# evaluated in float64 (float32's 1 ± tanh cancels where tanh saturates), output in x's dtype.
_GELU_K = np.sqrt(2.0 / np.pi)


class GeluTanh(OpRun):
    op_domain = DOMAIN

    def _run(self, x):
        x64 = x.astype(np.float64)
        return (0.5 * x64 * (1.0 + np.tanh(_GELU_K * (x64 + 0.044715 * x64 ** 3)))).astype(x.dtype),


class GeluTanhGrad(OpRun):
    op_domain = DOMAIN

    def _run(self, x, dy):
        x64 = x.astype(np.float64)
        t = np.tanh(_GELU_K * (x64 + 0.044715 * x64 ** 3))
        du = _GELU_K * (1.0 + 3 * 0.044715 * x64 * x64)
        return (dy.astype(np.float64) * 0.5 * ((1.0 + t) + x64 * (1.0 - t * t) * du)).astype(x.dtype),


# RMSNorm over the last axis (pointwise_operators.py), from its definition, in float64.
class RmsNorm(OpRun):
    op_domain = DOMAIN

    def _run(self, x, weight, epsilon=None):
        x64 = x.astype(np.float64)
        rstd = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + epsilon)
        return (x64 * rstd * weight).astype(x.dtype), rstd.astype(np.float32)


class RmsNormGrad(OpRun):
    op_domain = DOMAIN

    def _run(self, x, weight, rstd, dy):
        x64, r = x.astype(np.float64), rstd.astype(np.float64)
        g = dy.astype(np.float64) * weight
        return (g * r - x64 * r ** 3 * np.mean(g * x64, axis=-1, keepdims=True)).astype(x.dtype),


# LayerNorm's input gradient over the last axis (pointwise_operators.py), in float64.
class LayerNormGrad(OpRun):
    op_domain = DOMAIN

    def _run(self, x, mean, rstd, dy, weight):
        x64, mu, r = x.astype(np.float64), mean.astype(np.float64), rstd.astype(np.float64)
        g = dy.astype(np.float64) * weight
        c = x64 - mu
        dx = (g - g.mean(axis=-1, keepdims=True)) * r - c * r ** 3 * (g * c).mean(axis=-1, keepdims=True)
        return dx.astype(x.dtype),


# Wan's RoPE on interleaved pairs (pointwise_operators.py), as a complex product in float64.
class Rope(OpRun):
    op_domain = DOMAIN

    def _run(self, x, cos, sin):
        b, s, c = x.shape
        pairs = x.astype(np.float64).reshape(b, s, -1, cos.shape[-1], 2)
        rotated = (pairs[..., 0] + 1j * pairs[..., 1]) * (cos.astype(np.float64) + 1j * sin.astype(np.float64))
        return np.stack([rotated.real, rotated.imag], axis=-1).reshape(b, s, c).astype(x.dtype),


NEW_OPS = [FlashAttention, FlashAttentionGrad, GeluTanh, GeluTanhGrad, RmsNorm, RmsNormGrad, LayerNormGrad, Rope]


def operator_test_model() -> "onnx.ModelProto":
    """Both operators in bfloat16 and, on the same inputs cast to float32, in float32: lets the
    Rust tests check flowstep's bf16 kernels against its f32 ones (tests/golden/)."""
    import onnx
    from onnx import TensorProto, helper

    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    shapes = {"q": [1, 5, 2, 8], "k": [1, 7, 2, 8], "v": [1, 7, 2, 8], "do": [1, 5, 2, 8]}
    nodes = [helper.make_node("Cast", [n], [f"{n}32"], to=f32) for n in shapes]
    outputs = []
    for suffix, elem in (("", bf16), ("32", f32)):
        names = {n: f"{n}{suffix}" for n in ("q", "k", "v", "do", "o", "lse", "dq", "dk", "dv")}
        nodes.append(helper.make_node("FlashAttention", [names["q"], names["k"], names["v"]], [names["o"], names["lse"]],
                                      domain=DOMAIN, scale=0.35))
        nodes.append(helper.make_node("FlashAttentionGrad", [names[n] for n in ("q", "k", "v", "o", "lse", "do")],
                                      [names["dq"], names["dk"], names["dv"]], domain=DOMAIN, scale=0.35))
        out_shapes = {"o": shapes["q"], "lse": [1, 2, 5], "dq": shapes["q"], "dk": shapes["k"], "dv": shapes["v"]}
        outputs += [helper.make_tensor_value_info(names[n], f32 if n == "lse" else elem, s) for n, s in out_shapes.items()]
    graph = helper.make_graph(nodes, "flash_attention_bf16_vs_f32",
                              [helper.make_tensor_value_info(n, bf16, s) for n, s in shapes.items()], outputs)
    # IR version 10: what the exporter writes and ONNX Runtime 1.31 reads (onnx 1.23 defaults to 14).
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def pair_model(elem: int, scale: float) -> "onnx.ModelProto":
    """FlashAttention then FlashAttentionGrad on its o and lse, as a training graph chains them,
    in one element type, any [B, S, H, D] shape: the GPU parity test runs it on the CUDA
    kernels against PyTorch (tests/cuda_attention_parity.rs, tests/golden/)."""
    import onnx
    from onnx import TensorProto, helper

    q, kv = ["B", "Sq", "H", "D"], ["B", "Sk", "H", "D"]
    nodes = [helper.make_node("FlashAttention", ["q", "k", "v"], ["o", "lse"], domain=DOMAIN, scale=scale),
             helper.make_node("FlashAttentionGrad", ["q", "k", "v", "o", "lse", "do"], ["dq", "dk", "dv"],
                              domain=DOMAIN, scale=scale)]
    inputs = [helper.make_tensor_value_info(n, elem, s) for n, s in (("q", q), ("k", kv), ("v", kv), ("do", q))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n == "lse" else elem, s)
               for n, s in (("o", q), ("lse", ["B", "H", "Sq"]), ("dq", q), ("dk", kv), ("dv", kv))]
    graph = helper.make_graph(nodes, f"flash_attention_pair_{TensorProto.DataType.Name(elem).lower()}", inputs, outputs)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
