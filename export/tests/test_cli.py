"""`python -m flowstep_export` in a subprocess: exit codes, errors, determinism."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

EXPORT_DIR = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "flowstep_export", *args], cwd=EXPORT_DIR,
                          capture_output=True, text=True, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_export_is_deterministic(tmp_path, tiny_artifacts):
    """Exporting again (another process, through the command line) gives a byte-identical
    training graph, LoRA init and base, and reports its validation. Only the training graph:
    every graph's bytes are compared with models/tiny in test_loss_weight_and_drift."""
    out = tmp_path / "again"
    result = run("--model", "tiny", "--out", str(out), "--lora-rank", "8", "--attention-chunk", "12", "--ship-base",
                 "--graphs", "training_model", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    grads = [v["max_rel"] for k, v in report["validation"].items() if k.startswith("training.grad@")]
    assert len(grads) == 2 and max(grads) < 1e-4, report["validation"]
    for name in ("training_model.onnx", "lora_init.safetensors", "base.safetensors"):
        assert digest(out / name) == digest(tiny_artifacts / name), name


def test_cli_rejects_bad_input(tmp_path):
    result = run("--model", "nope", "--out", str(tmp_path))
    assert result.returncode != 0 and "invalid choice" in result.stderr
    result = run("--model", "tiny", "--out", str(tmp_path), "--base", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 1 and "missing.safetensors" in result.stderr


def test_cli_rejects_latent_that_would_fix_an_axis(tmp_path):
    """An example latent of 1 frame makes torch.export specialise that axis; refuse it."""
    result = run("--model", "tiny", "--out", str(tmp_path), "--latent", "1,8,8", "--graphs", "inference_model")
    assert result.returncode == 1 and "frames >= 2" in result.stderr


def test_validation_catches_a_fixed_latent_axis(tmp_path):
    """Traced with 1 frame, torch.export bakes the frame count into reshapes; the export's
    own validation at a second latent size must catch it."""
    import dataclasses

    import pytest

    from flowstep_export.model.configs import get_config
    from flowstep_export.pipeline.export import ExportOptions, export_artifacts
    from flowstep_export.model.lora import LoraConfig
    from flowstep_export.pipeline.validate import validate_artifacts

    config = dataclasses.replace(get_config("tiny"), example_latent=(1, 8, 8))
    options = ExportOptions(out=tmp_path, lora=LoraConfig(rank=2), graphs=("inference_model",))
    export_artifacts(config, options)
    with pytest.raises(RuntimeError, match="latent 2x10x10"):
        validate_artifacts(tmp_path, config, options)


def test_cli_loads_base_with_model_prefix(tmp_path):
    """A checkpoint with a leading `model.` (as some Wan files have) loads; a wrong shape is named."""
    import torch
    from safetensors.torch import save_file

    from flowstep_export.model.configs import get_config
    from flowstep_export.model.model import WanModel, init_random

    model = WanModel(get_config("tiny"))
    init_random(model, 3)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "base.safetensors"))
    result = run("--model", "tiny", "--out", str(tmp_path / "a"), "--base", str(tmp_path / "base.safetensors"),
                 "--lora-rank", "4", "--graphs", "inference_model", "--no-validate", "-q")
    assert result.returncode == 0, result.stderr
    state["model.head.head.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    result = run("--model", "tiny", "--out", str(tmp_path / "b"), "--base", str(tmp_path / "bad.safetensors"),
                 "--graphs", "inference_model", "-q")
    assert result.returncode == 1 and "head.head.weight" in result.stderr


def test_attention_default_follows_the_precision(tmp_path):
    """Without --attention: fused for float32 exports (the CPU's, where the fused kernels beat
    the chunked Scan, BENCHMARKS.md), chunked for bfloat16 ones (GPUs: a default build has no
    fused CUDA kernels) and whenever --attention-chunk is given; the manifest says which. An
    explicit --attention wins, and --attention-chunk with fused is refused."""
    from flowstep_export.__main__ import attention_impl, parse_args

    def resolved(*flags):
        return attention_impl(parse_args(["--model", "tiny", "--out", str(tmp_path), *flags]))

    assert resolved() == "fused"
    assert resolved("--precision", "bfloat16") == "chunked"
    assert resolved("--attention-chunk", "64") == "chunked"
    assert resolved("--attention", "chunked") == "chunked"
    assert resolved("--precision", "bfloat16", "--attention", "fused") == "fused"
    result = run("--model", "tiny", "--out", str(tmp_path / "x"), "--attention", "fused", "--attention-chunk", "12")
    assert result.returncode == 1 and "--attention-chunk applies to chunked attention" in result.stderr
    result = run("--model", "tiny", "--out", str(tmp_path / "f32"), "--graphs", "inference_model", "--no-validate", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "f32" / "manifest.json").read_text())
    assert manifest["training"]["attention"]["impl"] == "fused"
