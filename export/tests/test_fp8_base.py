"""fp8 base weights (`--base-dtype float8_e4m3fn`, docs/DESIGN.md §3.2, §3.6): tiny exports with
per-tensor and block scales validated against a PyTorch reference that dequantizes the same
way, trained by flowstep against the float32 graphs on the same dequantized weights, and the
fp8 files users have (ComfyUI's `*_fp8_e4m3fn` and `*_fp8_scaled`, musubi's block-wise
`fp8_scaled`) read as --base, or refused in one line.

Measured (tiny, CPU): the fp8 graphs match the reference to 0 in the loss and 4.1e-7 (tensor) /
~3e-7 (block) of the LoRA gradient's max, and flowstep's fp8 training equals the float32
graphs fed the host-dequantized file to float32 rounding (~1e-7). FP8_RTOL is 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from independent import TINY, flowstep

FP8_RTOL = 1e-5
# models/tiny's layout (rank 8, chunk 12), so that its float32 graphs and these share a LoRA.
# The committed tiny base, not a fresh seeded init: its bits would depend on PyTorch's CPU kernels
# (docs/DESIGN.md §4), and the converter test compares quantized bytes exactly.
EXPORT = ["--model", "tiny", "--lora-rank", "8", "--attention-chunk", "12", "--base-dtype", "float8_e4m3fn", "--ship-base",
          "--base", str(TINY / "base.safetensors"), "--graphs", "training_model,eval_model,optimizer_model"]


def export(out: Path, *extra) -> dict:
    result = subprocess.run([sys.executable, "-m", "flowstep_export", *EXPORT, "--out", str(out), *extra],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    reports = {scale: export(tmp / scale, "--fp8-scale", scale) for scale in ("tensor", "block")}
    data = tmp / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_file({"latents": torch.randn(16, 2, 8, 8, generator=g), "context": torch.randn(16, 64, generator=g)},
                  str(data / f"sample-{i}.safetensors"))
    return {"tensor": tmp / "tensor", "block": tmp / "block", "data": data, "tmp": tmp, "reports": reports}


def eval_loss(artifacts: Path, data: Path, base: Path | None = None) -> float:
    args = ["eval", "--artifacts", artifacts, "--data", data, "--json"] + (["--base", base] if base else [])
    return json.loads(flowstep(*args).stdout)["eval_loss"]


def refusal(artifacts: Path, data: Path, base: Path) -> str:
    result = flowstep("eval", "--artifacts", artifacts, "--data", data, "--base", base, check=False)
    assert result.returncode != 0 and "panicked" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("scale", ["tensor", "block"])
def test_export_matches_a_reference_that_dequantizes_the_same_way(exports, scale):
    manifest = json.loads((exports[scale] / "manifest.json").read_text())
    tensors = {t["name"]: t for t in manifest["base_weights"]["tensors"]}
    q = tensors["blocks.0.self_attn.q.weight"]
    assert q["dtype"] == "float8_e4m3fn"
    assert tensors["blocks.0.self_attn.q.scale_weight"] == {
        "name": "blocks.0.self_attn.q.scale_weight", "dtype": "float32", "shape": [1] if scale == "tensor" else [64, 1, 1]}
    assert tensors["head.head.weight"]["dtype"] == "float32" and tensors["blocks.0.norm3.weight"]["dtype"] == "float32"
    assert manifest["training"]["fp8"]["scale"] == scale and manifest["exporter"]["opset"] == 19
    assert "CommonSubexpressionElimination" in manifest["training"]["onnxruntime_disabled_optimizers"]
    report = exports["reports"][scale]["validation"]
    assert {k.split("@")[0] for k in report} == {"training.loss", "training.grad"}
    assert all(v["max_rel"] <= FP8_RTOL for v in report.values()), report


def test_backward_dequantizes_again(exports):
    """Each fp8 weight whose input gradient is needed is cast in the forward and again in the
    backward: one shared cast would keep every dequantized weight alive between the two."""
    import onnx

    model = onnx.load(str(exports["tensor"] / "training_model.onnx"))
    fp8 = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT8E4M3FN}
    casts = [n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in fp8]
    assert set(casts) == fp8 and len(casts) > len(fp8) + len(fp8) // 2, (len(casts), len(fp8))


def test_training_equals_the_float32_graphs_on_the_dequantized_weights(exports):
    """flowstep trains the fp8 export (dequantized in the graph) as it trains models/tiny's
    float32 graphs given the same fp8 file (dequantized on the host), from the same LoRA."""
    fp8 = exports["tensor"]
    base, init = fp8 / "base.safetensors", fp8 / "lora_init.safetensors"
    runs = {}
    for name, artifacts, extra in (("fp8", fp8, []), ("float32", TINY, ["--base", base])):
        out = exports["tmp"] / f"train-{name}"
        flowstep("-q", "train", "--artifacts", artifacts, "--data", exports["data"], "--out", out, "--steps", 4,
                 "--lr", 1e-2, "--seed", 5, "--init-lora", init, "--lora-dtype", "f32", *extra)
        runs[name] = ([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)],
                      load_file(str(out / "lora.safetensors")))
    (loss8, lora8), (loss32, lora32) = runs["fp8"], runs["float32"]
    assert len(loss8) == 4 and np.allclose(loss8, loss32, rtol=FP8_RTOL, atol=0), (loss8, loss32)
    scale = max(float(v.abs().max()) for v in lora32.values())
    assert max(float((lora8[k] - lora32[k]).abs().max()) for k in lora32) <= FP8_RTOL * scale


def comfyui_file(fp8_base: Path, out: Path, prefix: str = "model.diffusion_model.", scales: str = "keep") -> Path:
    """ComfyUI's fp8_scaled layout of a shipped fp8 base: 0-d float32 `scale_weight`, the
    `scaled_fp8` marker, ComfyUI's key prefix. scales "ones" sets each to 1, "drop" writes
    ComfyUI's plain fp8_e4m3fn file (no scales, no marker)."""
    state = {}
    for k, v in load_file(str(fp8_base)).items():
        if k.endswith(".scale_weight"):
            if scales == "drop":
                continue
            v = torch.ones(()) if scales == "ones" else v.reshape(())
        state[prefix + k] = v
    if scales != "drop":
        state[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(state, str(out))
    return out


def test_comfyui_and_musubi_files_load_as_base(exports):
    tensor, block, data, tmp = exports["tensor"], exports["block"], exports["data"], exports["tmp"]
    shipped = eval_loss(tensor, data)
    scaled = comfyui_file(tensor / "base.safetensors", tmp / "wan_fp8_scaled.safetensors")
    assert eval_loss(tensor, data, scaled) == shipped
    # A plain fp8_e4m3fn file reads as scale 1, exactly like a scaled file of ones; real scales differ.
    plain = eval_loss(tensor, data, comfyui_file(tensor / "base.safetensors", tmp / "wan_fp8_e4m3fn.safetensors", scales="drop"))
    ones = eval_loss(tensor, data, comfyui_file(tensor / "base.safetensors", tmp / "ones.safetensors", scales="ones"))
    assert plain == ones and abs(plain - shipped) > 1e-3 * shipped
    # Per-tensor scales fill a block export's blocks: the same weights, the same loss.
    assert eval_loss(block, data, scaled) == pytest.approx(shipped, rel=FP8_RTOL)
    # musubi's block-wise file (bf16 scales [out, in/64, 1], no prefix) into the block export.
    musubi = {k: v.to(torch.bfloat16) if k.endswith(".scale_weight") else v for k, v in load_file(str(block / "base.safetensors")).items()}
    save_file(musubi, str(tmp / "musubi.safetensors"))
    as_f32 = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in musubi.items()}
    save_file(as_f32, str(tmp / "musubi-f32-scales.safetensors"))
    assert eval_loss(block, data, tmp / "musubi.safetensors") == eval_loss(block, data, tmp / "musubi-f32-scales.safetensors")
    # A float32 export dequantizes the fp8 file on the host: the same loss as the fp8 graphs.
    assert eval_loss(TINY, data, scaled) == pytest.approx(shipped, rel=FP8_RTOL)


def test_converter_quantizes_as_the_export(exports, tmp_path):
    """python -m flowstep_export.model.fp8 on models/tiny's float32 base (the same seed-0 weights)
    writes the weights and scales the export quantized; the block layout loads and evaluates
    as the shipped base."""
    for scale in ("tensor", "block"):
        out = tmp_path / f"{scale}.safetensors"
        result = subprocess.run([sys.executable, "-m", "flowstep_export.model.fp8", str(TINY / "base.safetensors"), str(out),
                                 "--scale", scale], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        converted, shipped = load_file(str(out)), load_file(str(exports[scale] / "base.safetensors"))
        for k, v in shipped.items():
            got = converted[k].reshape(v.shape)
            same = torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dtype == torch.float8_e4m3fn else torch.equal(got, v)
            assert same, k
        assert eval_loss(exports[scale], exports["data"], out) == eval_loss(exports[scale], exports["data"])


def test_bad_fp8_files_are_refused_in_one_line(exports):
    tensor, block, data, tmp = exports["tensor"], exports["block"], exports["data"], exports["tmp"]
    line = refusal(tensor, data, TINY / "base.safetensors")
    assert "`blocks.0.self_attn.q.weight` is F32" in line and "float8_e4m3fn" in line and "python -m flowstep_export.model.fp8" in line
    state = load_file(str(comfyui_file(tensor / "base.safetensors", tmp / "x.safetensors", prefix="")))
    del state["blocks.1.ffn.2.scale_weight"]
    save_file(state, str(tmp / "missing-scale.safetensors"))
    assert "missing `blocks.1.ffn.2.scale_weight`" in refusal(tensor, data, tmp / "missing-scale.safetensors")
    state = load_file(str(tensor / "base.safetensors"))
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"].float().to(torch.float8_e5m2)
    save_file(state, str(tmp / "e5m2.safetensors"))
    assert "`blocks.0.ffn.0.weight` is F8_E5M2" in refusal(tensor, data, tmp / "e5m2.safetensors")
    assert "re-export with --fp8-scale block" in refusal(tensor, data, block / "base.safetensors")
    state = load_file(str(tensor / "base.safetensors"))
    state["blocks.0.self_attn.k.scale_weight"] = torch.tensor([float("nan")])
    save_file(state, str(tmp / "nan-scale.safetensors"))
    assert "finite and positive" in refusal(tensor, data, tmp / "nan-scale.safetensors")


def test_tools_refuse_in_one_line(tmp_path):
    for args in (["-m", "flowstep_export", "--model", "tiny", "--out", str(tmp_path / "a"), "--fp8-scale", "block"],
                 ["-m", "flowstep_export.model.fp8", str(TINY / "missing.safetensors"), str(tmp_path / "b")]):
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
