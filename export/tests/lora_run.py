"""One training run on the committed tiny export (rank 8, alpha 8) at `--lora-alpha 16`,
shared by the LoRA file tests: the same parameters written in every file layout and dtype
(the comfyui layout by default, no flag), and the parameters themselves from the final
checkpoint. The comfyui f32 run also evaluates its final parameters (summary.json)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from independent import TINY, final_state, flowstep, manifest, unflatten

RANK, ALPHA = 8, 16.0  # train-time alpha = 2·rank on an export whose alpha is its rank


def train_alpha_run(tmp: Path) -> SimpleNamespace:
    art = TINY
    assert manifest(art)["lora"]["alpha"] == RANK and manifest(art)["lora"]["rank"] == RANK
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
            evaluate = ["--eval-data", data] if (fmt, dtype) == ("comfyui", "f32") else []
            flowstep("-q", "train", "--artifacts", art, "--data", data, "--out", out, "--steps", 12, "--lr", 5e-3,
                     "--seed", 4, "--lora-alpha", ALPHA, "--lora-dtype", dtype, *layout, *evaluate)
            runs[fmt, dtype] = out
    params = final_state(runs["diffsynth", "f32"])["params"]
    for out in runs.values():
        assert torch.equal(final_state(out)["params"], params), "same seed, same parameters"
    trained = unflatten(art, params)
    assert all(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k), "B must be non-zero"
    return SimpleNamespace(art=art, data=data, runs=runs, trained=trained)
