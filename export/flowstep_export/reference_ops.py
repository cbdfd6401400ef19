"""NumPy implementations of the com.flowstep attention operators for ONNX's reference
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

from .attention import DOMAIN


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


NEW_OPS = [FlashAttention, FlashAttentionGrad]
