"""The CUDA kernel coverage check: exported graphs against ONNX Runtime 1.31.1's CUDA registry."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from flowstep_export.pipeline import cuda_coverage, cuda_kernels

REPO = Path(__file__).resolve().parents[2]
EXPORT_DIR = REPO / "export"
COMMITTED = sorted((REPO / "models" / "tiny" / "artifacts").glob("*.onnx")) + \
    sorted((REPO / "models" / "toy" / "artifacts").glob("*.onnx")) + \
    sorted((REPO / "models" / "tiny-ti2v" / "artifacts").glob("*.onnx"))
BF16, F32, I64 = TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.INT64


def unary(op: str, elem: int, opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, [2, 3])
    y = helper.make_tensor_value_info("y", elem, [2, 3])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], name=f"the_{op.lower()}")], op, [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_registry_is_onnxruntime_1_31_1_cuda():
    source = cuda_kernels.load()["source"]
    assert source["onnxruntime_version"] == "1.31.1"
    assert "git-commit-id=6af1a932e" in source["build_info"]
    assert "CUDAExecutionProvider" in source["what"]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_committed_float32_graphs_are_covered(path):
    report = cuda_coverage.analyze(onnx.load(str(path)))
    assert report.nodes > 0
    assert report.problems == [], report.problems[:5]
    assert report.cpu_by_design == [], report.cpu_by_design[:5]


def test_bf16_reciprocal_is_reported():
    problems = cuda_coverage.check(unary("Reciprocal", BF16, 18))
    assert len(problems) == 1 and "the_reciprocal Reciprocal" in problems[0] and "bfloat16" in problems[0]
    assert cuda_coverage.check(unary("Reciprocal", F32, 18)) == []


@pytest.mark.parametrize("op", ["Cos", "Sin"])
def test_bf16_cos_sin_need_opset_22(op):
    problems = cuda_coverage.check(unary(op, BF16, 18))
    assert len(problems) == 1 and f"{op}-7" in problems[0], problems
    assert cuda_coverage.check(unary(op, BF16, 22)) == []
    assert cuda_coverage.check(unary(op, F32, 18)) == []


def test_a_kernel_with_several_constraints_matches_as_one_combination():
    """LayerNormalization-17 on CUDA: T in {float, double, float16, bfloat16} with U (stash) float only."""
    def layer_norm(elem, stash):
        x = helper.make_tensor_value_info("x", elem, [2, 8])
        y = helper.make_tensor_value_info("y", elem, [2, 8])
        mean = helper.make_tensor_value_info("mean", stash, [2, 1])
        scale = helper.make_tensor("scale", elem, [8], [1.0] * 8)
        node = helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"], axis=-1,
                                stash_type=stash, name="ln")
        graph = helper.make_graph([node], "ln", [x], [y, mean], [scale])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    assert cuda_coverage.check(layer_norm(BF16, F32)) == []
    problems = cuda_coverage.check(layer_norm(BF16, BF16))
    assert len(problems) == 1 and "ln LayerNormalization" in problems[0]


def test_integer_shape_arithmetic_without_a_cuda_kernel_is_cpu_by_design():
    """ReduceProd has no int64 CUDA kernel; int64-only nodes stay on the CPU and are not failures."""
    x = helper.make_tensor_value_info("shape", I64, [4])
    y = helper.make_tensor_value_info("numel", I64, [])
    graph = helper.make_graph([helper.make_node("ReduceProd", ["shape"], ["numel"], keepdims=0, name="numel")],
                              "g", [x], [y])
    report = cuda_coverage.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert report.problems == []
    assert len(report.cpu_by_design) == 1 and "numel ReduceProd" in report.cpu_by_design[0]


def test_unknown_types_are_problems_not_passes():
    x = helper.make_tensor_value_info("x", BF16, [2, 3])
    y = helper.make_tensor_value_info("y", BF16, [2, 3])
    # "t" has no type anywhere and inference cannot see through the unknown-domain node.
    nodes = [helper.make_node("Mystery", ["x"], ["t"], domain="example.custom", name="mystery"),
             helper.make_node("Exp", ["t"], ["y"], name="exp")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("example.custom", 1)])
    problems = cuda_coverage.check(model)
    assert any("mystery" in p and "domain" in p for p in problems), problems
    assert any(p.startswith("exp Exp") and "unknown" in p for p in problems), problems


def test_cli_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "flowstep_export.pipeline.cuda_coverage", *map(str, args)],
                              cwd=EXPORT_DIR, capture_output=True, text=True, timeout=300)

    ok = run(REPO / "models" / "tiny" / "artifacts")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": ok:") == len(list((REPO / "models" / "tiny" / "artifacts").glob("*.onnx")))
    onnx.save(unary("Reciprocal", BF16, 18), str(tmp_path / "recip.onnx"))
    onnx.save(unary("Cos", BF16, 22), str(tmp_path / "cos22.onnx"))
    bad = run(tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "recip.onnx: FAIL" in bad.stdout and "Reciprocal" in bad.stdout and "cos22.onnx: ok" in bad.stdout
