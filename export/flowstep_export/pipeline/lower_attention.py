"""Lower `com.flowstep` FlashAttention / FlashAttentionGrad nodes to standard ONNX ops.

Queries are processed `chunk` rows at a time inside a `Scan`, so the largest attention
tensor alive at any moment is [B, H, chunk, Sk] in float32, whatever the sequence length:
memory grows linearly with the tokens. Each chunk holds whole rows of the score matrix, so
its softmax is exact. The backward recomputes each chunk's probabilities from q, k and the
saved log-sum-exp (FlashAttention's recompute) and accumulates dK and dV as Scan state.

Two things would silently undo the recompute if this were written as unrolled plain ops
(docs/DESIGN.md §6a): common-subexpression elimination merging the backward's recomputation with
the forward, and an execution order that computes every chunk before consuming any. A Scan
body is a separate graph that runs one iteration at a time, so neither can happen.

The sequence length is dynamic: the queries are padded up to a whole number of chunks with
copies of their own first rows (finite values; their outputs are sliced off, and their
incoming gradients and rowsum(dO∘O) are zero, so they contribute nothing to dK and dV).

Softmax statistics, the probabilities, and dK/dV accumulators are float32; the matrix
products run in the graph's compute dtype (float32 or bfloat16), as flash kernels do.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model.attention import DOMAIN

FLOAT = TensorProto.FLOAT


class _Builder:
    """Appends nodes with fresh names to a list; `prefix` keeps names unique per lowered node."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64, hint: str = "const") -> str:
        tensor = numpy_helper.from_array(np.array(value, dtype=dtype), self.name(hint))
        return self.op("Constant", [], hint, value=tensor)

    def cast(self, x: str, to: int, source: int) -> str:
        return x if to == source else self.op("Cast", [x], "cast", to=to)

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", [x], "transpose", perm=perm)


class _Chunking:
    """The dynamic chunk geometry of one node: sequence length S, n = ceil(S / chunk) chunks
    of c = ceil(S / n) rows each (at most `chunk`), pad = n·c - S < n.

    Balanced chunks keep the padding below one row per chunk: with c = chunk, 1,280 tokens in
    chunks of 512 would compute 256 padded rows (20% more attention work)."""

    def __init__(self, b: _Builder, heads_first: str, chunk: int):
        # heads_first: any [B, H, S, D] tensor of the queries.
        self.b = b
        self.shape = b.op("Shape", [heads_first], "shape")
        self.seq = b.op("Slice", [self.shape, b.const([2]), b.const([3])], "seq")
        self.count = self._ceil_div(self.seq, b.const([chunk]), "num_chunks")
        self.chunk = self._ceil_div(self.seq, self.count, "chunk")
        self.pad = b.op("Sub", [b.op("Mul", [self.count, self.chunk]), self.seq], "pad")
        self.batch_heads = b.op("Slice", [self.shape, b.const([0]), b.const([2])], "batch_heads")

    def _ceil_div(self, a: str, d: str, hint: str) -> str:
        b = self.b
        return b.op("Div", [b.op("Sub", [b.op("Add", [a, d]), b.const([1])]), d], hint)

    def split(self, x: str, zeros_of: int | None = None, has_last_dim: bool = True) -> str:
        """[B, H, S(, D)] -> [n, B, H, c(, D)], padded with x's first rows, or with zeros of
        elem type `zeros_of` (x's type) when given."""
        b = self.b
        head = b.op("Slice", [x, b.const([0]), self.pad, b.const([2])], "pad_rows")
        if zeros_of is not None:
            head = b.op("Mul", [head, b.cast(b.const(0.0, np.float32), zeros_of, FLOAT)], "zero_rows")
        padded = b.op("Concat", [x, head], "padded", axis=2)
        parts = [self.batch_heads, self.count, self.chunk]
        if has_last_dim:
            parts.append(b.op("Slice", [b.op("Shape", [x]), b.const([3]), b.const([4])], "last_dim"))
        chunks = b.op("Reshape", [padded, b.op("Concat", parts, "chunk_shape", axis=0)], "chunked")
        return b.transpose(chunks, [2, 0, 1, 3, 4] if has_last_dim else [2, 0, 1, 3])

    def join(self, chunks: str, has_last_dim: bool = True) -> str:
        """[n, B, H, c(, D)] -> [B, H, S(, D)]."""
        b = self.b
        x = b.transpose(chunks, [1, 2, 0, 3, 4] if has_last_dim else [1, 2, 0, 3])
        shape = [self.batch_heads, b.const([-1])]
        if has_last_dim:
            shape.append(b.op("Slice", [b.op("Shape", [chunks]), b.const([4]), b.const([5])], "last_dim"))
        x = b.op("Reshape", [x, b.op("Concat", shape, "joined_shape", axis=0)], "joined")
        return b.op("Slice", [x, b.const([0]), self.seq, b.const([2])], "unpadded")


def _value(name: str, elem_type: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None)


def _forward(node: onnx.NodeProto, dtype: int, chunk: int, prefix: str) -> list[onnx.NodeProto]:
    q, k, v = node.input
    o_out, lse_out = node.output
    scale = helper.get_attribute_value(next(a for a in node.attribute if a.name == "scale"))
    b = _Builder(prefix)
    # Scale folded into q once (O(S·D)), not into every chunk's scores.
    q_h = b.op("Mul", [b.transpose(q, [0, 2, 1, 3]), b.cast(b.const(scale, np.float32), dtype, FLOAT)], "q_scaled")
    k_t = b.transpose(k, [0, 2, 3, 1])  # [B, H, D, Sk]
    v_h = b.transpose(v, [0, 2, 1, 3])  # [B, H, Sk, D]
    geometry = _Chunking(b, q_h, chunk)
    q_chunks = geometry.split(q_h)

    body = _Builder(prefix + "/body")
    q_c = body.name("q_chunk")
    s = body.cast(body.op("MatMul", [q_c, k_t], "scores"), FLOAT, dtype)
    p = body.op("Softmax", [s], "probs", axis=-1)
    # The row maximum has probability exp(max - lse), so lse = max - log(max p): two cheap
    # reductions next to the fused Softmax kernel (ReduceLogSumExp is several times slower
    # on the CPU provider).
    axis = body.const([-1])
    lse_c = body.op("Sub", [body.op("ReduceMax", [s, axis], "row_max", keepdims=0),
                            body.op("Log", [body.op("ReduceMax", [p, axis], "max_prob", keepdims=0)])], "lse_chunk")
    o_c = body.op("MatMul", [body.cast(p, dtype, FLOAT), v_h], "o_chunk")
    graph = helper.make_graph(body.nodes, prefix + "/forward_chunk", [_value(q_c, dtype)], [_value(o_c, dtype), _value(lse_c, FLOAT)])
    o_chunks, lse_chunks = b.op("Scan", [q_chunks], "scan", outputs=2, body=graph, num_scan_inputs=1)

    o = geometry.join(o_chunks)
    b.nodes.append(helper.make_node("Transpose", [o], [o_out], name=b.name("o"), perm=[0, 2, 1, 3]))
    b.nodes.append(helper.make_node("Identity", [geometry.join(lse_chunks, has_last_dim=False)], [lse_out], name=b.name("lse")))
    return b.nodes


def _backward(node: onnx.NodeProto, dtype: int, chunk: int, prefix: str) -> list[onnx.NodeProto]:
    q, k, v, o, lse, do = node.input
    dq_out, dk_out, dv_out = node.output
    scale = helper.get_attribute_value(next(a for a in node.attribute if a.name == "scale"))
    b = _Builder(prefix)
    scale_c = b.cast(b.const(scale, np.float32), dtype, FLOAT)
    q_h = b.op("Mul", [b.transpose(q, [0, 2, 1, 3]), scale_c], "q_scaled")
    k_h = b.transpose(k, [0, 2, 1, 3])  # [B, H, Sk, D]
    k_t = b.transpose(k, [0, 2, 3, 1])  # [B, H, D, Sk]
    v_t = b.transpose(v, [0, 2, 3, 1])
    do_h = b.transpose(do, [0, 2, 1, 3])
    o_h = b.transpose(o, [0, 2, 1, 3])
    # delta = rowsum(dO ∘ O) in float32: [B, H, Sq]
    delta = b.op("ReduceSum", [b.op("Mul", [b.cast(do_h, FLOAT, dtype), b.cast(o_h, FLOAT, dtype)]), b.const([-1])], "delta", keepdims=0)
    geometry = _Chunking(b, q_h, chunk)
    scans = [geometry.split(q_h), geometry.split(do_h, zeros_of=dtype),
             geometry.split(lse, has_last_dim=False), geometry.split(delta, zeros_of=FLOAT, has_last_dim=False)]
    zeros = b.op("ConstantOfShape", [b.op("Shape", [k_h])], "zeros", value=numpy_helper.from_array(np.zeros(1, np.float32)))

    body = _Builder(prefix + "/body")
    dk_acc, dv_acc, q_c, do_c, lse_c, delta_c = (body.name(n) for n in ("dk_acc", "dv_acc", "q_chunk", "do_chunk", "lse_chunk", "delta_chunk"))
    s = body.cast(body.op("MatMul", [q_c, k_t], "scores"), FLOAT, dtype)
    p = body.op("Exp", [body.op("Sub", [s, body.op("Unsqueeze", [lse_c, body.const([-1])])])], "probs")
    p_d = body.cast(p, dtype, FLOAT)
    dv_next = body.op("Add", [dv_acc, body.cast(body.op("MatMul", [body.transpose(p_d, [0, 1, 3, 2]), do_c]), FLOAT, dtype)], "dv_acc")
    dp = body.cast(body.op("MatMul", [do_c, v_t], "dprobs"), FLOAT, dtype)
    ds = body.cast(body.op("Mul", [p, body.op("Sub", [dp, body.op("Unsqueeze", [delta_c, body.const([-1])])])], "dscores"), dtype, FLOAT)
    dq_c = body.op("MatMul", [ds, k_h], "dq_chunk")
    dk_next = body.op("Add", [dk_acc, body.cast(body.op("MatMul", [body.transpose(ds, [0, 1, 3, 2]), q_c]), FLOAT, dtype)], "dk_acc")
    graph = helper.make_graph(
        body.nodes, prefix + "/backward_chunk",
        [_value(dk_acc, FLOAT), _value(dv_acc, FLOAT), _value(q_c, dtype), _value(do_c, dtype), _value(lse_c, FLOAT), _value(delta_c, FLOAT)],
        [_value(dk_next, FLOAT), _value(dv_next, FLOAT), _value(dq_c, dtype)])
    dk, dv, dq_chunks = b.op("Scan", [zeros, zeros] + scans, "scan", outputs=3, body=graph, num_scan_inputs=4)

    # q was pre-scaled, so dK already carries the scale; dQ gets it here.
    dq = b.op("Mul", [geometry.join(dq_chunks), scale_c], "dq")
    b.nodes.append(helper.make_node("Transpose", [dq], [dq_out], name=b.name("dq"), perm=[0, 2, 1, 3]))
    b.nodes.append(helper.make_node("Transpose", [b.cast(dk, dtype, FLOAT)], [dk_out], name=b.name("dk"), perm=[0, 2, 1, 3]))
    b.nodes.append(helper.make_node("Transpose", [b.cast(dv, dtype, FLOAT)], [dv_out], name=b.name("dv"), perm=[0, 2, 1, 3]))
    return b.nodes


def lower_attention(model: onnx.ModelProto, chunk: int, dtype: int = FLOAT) -> int:
    """Replace every com.flowstep attention node in place; returns how many were lowered."""
    if chunk < 1:
        raise ValueError(f"attention chunk must be at least 1, got {chunk}")
    lowered, nodes = 0, []
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in ("FlashAttention", "FlashAttentionGrad"):
            lower = _forward if node.op_type == "FlashAttention" else _backward
            nodes.extend(lower(node, dtype, chunk, f"attention{lowered}"))
            lowered += 1
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return lowered
