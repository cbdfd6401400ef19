"""Writes assets/grad_sum_squares.onnx, the graph `flowstep train --max-grad-norm` runs on the
accumulated gradient where it lives (the device): one ReduceSumSquare over the flat [P]
buffer, any P. flowstep embeds the file; export/tests/test_grad_norm_graph.py checks that the
committed file is what this script writes.

python -m flowstep_export.pipeline.grad_norm_graph [--out assets/grad_sum_squares.onnx]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deps import run_reporting_errors

DEFAULT_OUT = Path(__file__).resolve().parents[3] / "assets" / "grad_sum_squares.onnx"
OPSET = 18  # ReduceSumSquare-18: reduces over every axis when no `axes` input is given


def graph_bytes() -> bytes:
    """`sum_squares = Σ grads²`, float32, a scalar (keepdims 0)."""
    from onnx import TensorProto, checker, helper

    node = helper.make_node("ReduceSumSquare", ["grads"], ["sum_squares"], keepdims=0)
    graph = helper.make_graph([node], "grad_sum_squares",
                              [helper.make_tensor_value_info("grads", TensorProto.FLOAT, ["P"])],
                              [helper.make_tensor_value_info("sum_squares", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.pipeline.grad_norm_graph", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    code, _ = run_reporting_errors("grad_norm_graph", lambda: args.out.write_bytes(graph_bytes()))
    return code


if __name__ == "__main__":
    sys.exit(main())
