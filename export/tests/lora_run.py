"""One training run on a tiny export with alpha != rank, shared by the LoRA file tests: the
same parameters written in every file layout and dtype (the comfyui layout by default, no
flag), and the parameters themselves from the final checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from independent import final_state, flowstep, manifest, unflatten

RANK, ALPHA = 8, 4.0
EXPORT_DIR = Path(__file__).resolve().parents[1]


def train_alpha_run(tmp: Path) -> SimpleNamespace:
    art = tmp / "artifacts"
    result = subprocess.run([sys.executable, "-m", "flowstep_export", "--model", "tiny", "--out", str(art),
                             "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--ship-base", "-q",
                             "--graphs", "training_model,eval_model,optimizer_model,inference_model"],
                            cwd=EXPORT_DIR, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert manifest(art)["lora"]["alpha"] == ALPHA and manifest(art)["lora"]["rank"] == RANK
    data = tmp / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        save_file({"latents": torch.randn(16, 2, 8, 8, generator=g), "context": torch.randn(16, 64, generator=g)},
                  str(data / f"{i}.safetensors"))
    runs = {}
    for fmt in ("diffsynth", "comfyui"):
        for dtype in ("f32", "bf16"):
            out = tmp / f"run-{fmt}-{dtype}"
            layout = [] if fmt == "comfyui" else ["--lora-format", fmt]  # comfyui is the default
            flowstep("-q", "train", "--artifacts", art, "--data", data, "--out", out, "--steps", 12, "--lr", 5e-3,
                     "--seed", 4, "--lora-dtype", dtype, *layout)
            runs[fmt, dtype] = out
    params = final_state(runs["diffsynth", "f32"])["params"]
    for out in runs.values():
        assert torch.equal(final_state(out)["params"], params), "same seed, same parameters"
    trained = unflatten(art, params)
    assert all(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k), "B must be non-zero"
    return SimpleNamespace(art=art, data=data, runs=runs, trained=trained)
