"""Tracing a training step (forward + backward) into one FX graph and exporting it to ONNX.

Recipe (docs/DESIGN.md §2): the loss and `torch.autograd.grad` inside a `functional_call` of
the model (steps.py), traced by `make_fx` with the core ATen decompositions, over fake inputs
whose latent frames/height/width are symbolic; the graph is then exported with
`torch.onnx.export(dynamo=True, optimize=False)` and cleaned by a light pass.
"""

from __future__ import annotations

import dataclasses

import onnx
import onnx.inliner
import torch
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import OPSET
from ..model import pointwise_operators
from ..model.attention import DOMAIN, OPERATORS, TRANSLATION_TABLE
from .lower_attention import lower_attention

aten = torch.ops.aten


def _pow_tensor_scalar(x, exponent):
    """Autograd emits pow(x, 1.0), decompositions pow(x, 2|3): multiply instead."""
    if exponent == 1:
        return x.clone()
    if exponent == 2:
        return x * x
    if exponent == 3:
        return x * x * x
    return NotImplemented


def decomposition_table():
    table = dict(core_aten_decompositions())
    table[aten.pow.Tensor_Scalar] = _pow_tensor_scalar
    return table


@dataclasses.dataclass
class GraphInput:
    name: str
    example: torch.Tensor
    # axis -> symbolic dimension name, for the latent tensors' frames/height/width
    dynamic: dict[int, str] = dataclasses.field(default_factory=dict)


def trace(fn, inputs: list[GraphInput]) -> torch.fx.GraphModule:
    """make_fx over fake inputs; latent axes listed in `dynamic` stay symbolic."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for item in inputs:
        sizes = [DimDynamic.DYNAMIC if axis in item.dynamic else DimDynamic.STATIC for axis in range(item.example.dim())]
        context = StatelessSymbolicContext(dynamic_sizes=sizes)
        fakes.append(mode.from_tensor(item.example, symbolic_context=context))
    return make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake", _allow_non_fake_inputs=True)(*fakes)


class _GraphWrapper(torch.nn.Module):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return tuple(self.gm(*args))


ATTENTION_MODES = ("chunked", "fused")
# The com.flowstep operators an export with attention "fused" may keep (the pointwise ones only
# in float32: export.ExportOptions.fused_pointwise).
FUSED_OPERATORS = OPERATORS + pointwise_operators.OPERATORS


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How the exported graph is finished: attention chunk size (queries per chunk) and the
    compute dtype (ONNX elem type).

    `attention` "chunked" lowers the attention operator pair to standard ops (a Scan over query
    chunks, runs anywhere); "fused" keeps the `com.flowstep` FlashAttention / FlashAttentionGrad
    nodes for an executor that implements them (docs/fused-attention.md)."""
    attention_chunk: int
    dtype: int = onnx.TensorProto.FLOAT
    attention: str = "chunked"
    opset: int = OPSET
    # Common-subexpression elimination in the light pass (off for fp8 bases: fp8.py).
    cse: bool = True


def export(gm: torch.fx.GraphModule, inputs: list[GraphInput], output_names: list[str], lowering: Lowering) -> onnx.ModelProto:
    """torch.onnx.export of a traced graph, with named inputs/outputs and dynamic latent axes;
    the attention operators are lowered to standard ops (lower_attention.py) unless
    `lowering.attention` is "fused"."""
    if lowering.attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention {lowering.attention!r}; choose one of {', '.join(ATTENTION_MODES)}")
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str):
        # Height and width are whole patches (stride 2): export them as 2·n.
        if name not in dims:
            if name in ("height", "width"):
                dims[name] = 2 * torch.export.Dim(f"{name}_patches", min=1, max=512)
            else:
                dims[name] = torch.export.Dim(name, min=1, max=1024)
        return dims[name]

    dynamic = tuple({axis: dim(n) for axis, n in item.dynamic.items()} or None for item in inputs)
    program = torch.onnx.export(
        _GraphWrapper(gm),
        tuple(item.example for item in inputs),
        dynamo=True,
        opset_version=lowering.opset,
        optimize=False,
        input_names=[item.name for item in inputs],
        output_names=output_names,
        dynamic_shapes=(dynamic,),
        custom_translation_table={**TRANSLATION_TABLE, **pointwise_operators.TRANSLATION_TABLE},
        verbose=False,
    )
    light_optimize(program.model, cse=lowering.cse)
    model = onnx.inliner.inline_local_functions(program.model_proto)
    if lowering.attention == "chunked":
        lower_attention(model, lowering.attention_chunk, lowering.dtype)
    strip_debug_metadata(model)
    rename_dynamic_dims(model, inputs)
    check_standard_ops(model, allowed=FUSED_OPERATORS if lowering.attention == "fused" else ())
    return model


def light_optimize(ir_model, cse: bool = True) -> None:
    """Constant folding, CSE and dead-node removal; the full onnxscript optimizer does not
    finish on 30 blocks (docs/DESIGN.md §2).

    CSE does not merge activation checkpointing's recompute with the forward here (the
    recompute starts from the checkpoint's detached copies of the block inputs): on `small`
    at 4,096 tokens a checkpointed export has the same 24 Scans and peak RSS (544 vs 551 MB)
    with CSE as without, and 4,490 instead of 6,268 nodes (the merged ones are weight-side
    reshapes and transposes). tests/test_long_sequences.py keeps the recompute's Scans counted."""
    from onnxscript import optimizer
    from onnxscript.ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

    optimizer.fold_constants(ir_model)
    if cse:
        CommonSubexpressionEliminationPass()(ir_model)
    RemoveUnusedNodesPass()(ir_model)


def rename_dynamic_dims(model: onnx.ModelProto, inputs: list[GraphInput]) -> None:
    """Give dynamic axes the contract's names (frames, height, width) on inputs and outputs.
    An axis meant to be dynamic that the exporter fixed is an error, not a renamed lie."""
    names = {"frames": "frames", "2*height_patches": "height", "2*width_patches": "width"}
    by_name = {item.name: item for item in inputs}
    for value in list(model.graph.input) + list(model.graph.output):
        item = by_name.get(value.name)
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if item is not None and axis in item.dynamic:
                if not dim.dim_param:
                    raise RuntimeError(
                        f"input {value.name} axis {axis} ({item.dynamic[axis]}) was exported as the fixed size "
                        f"{dim.dim_value}; trace with an example latent of at least 2 frames and 2 patches per side")
                dim.dim_param = item.dynamic[axis]
            elif dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop torch's debug metadata (stack traces with source paths, unordered constraint
    dumps) so the same model exports to the same bytes anywhere."""
    del model.graph.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.producer_version = model.producer_version.split("+")[0]


def check_standard_ops(model: onnx.ModelProto, allowed: tuple[str, ...] = ()) -> None:
    """Every node must be a standard ONNX op (domain ""), so any ORT build runs the graph;
    `allowed` names the com.flowstep operators a fused export keeps."""
    bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") and not (n.domain == DOMAIN and n.op_type in allowed)})
    if bad or len(model.functions):
        raise RuntimeError(f"graph uses non-standard ops: {bad}, {len(model.functions)} local functions")
    onnx.checker.check_model(model, full_check=False)
