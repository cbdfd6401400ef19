"""The image-to-video demo's claim (`scripts/demo.sh i2v`), measured on samples: a LoRA trained
on the committed toy-i2v clips makes the model start its videos where the given first frame has
its blob, in its colour, on held-out first frames; the base model, whose `y` weights were never
trained, does not. `flowstep sample` draws each sample beside the first frame it was given."""

import subprocess

import torch
from PIL import Image
from safetensors.torch import load_file

from flowstep_export.data.toy_world import SIZE
from independent import ROOT, flowstep_bin

TOY_I2V = ROOT / "models" / "toy-i2v"


def centroid(frame: torch.Tensor) -> torch.Tensor:
    """(x, y) of the intensity centroid of one latent frame [C, H, W]."""
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    w = frame.pow(2).sum(0)
    w = w / w.sum().clamp_min(1e-8)
    return torch.stack([(w * xs).sum(), (w * ys).sum()])


def colour(video: torch.Tensor) -> torch.Tensor:
    """Channels 0-2 weighted by intensity, as `flowstep sample --report`'s colour."""
    w = video.pow(2).sum(0)
    return (video[:3] * w).sum((1, 2, 3)) / w.sum()


def errors(samples: torch.Tensor, clip: torch.Tensor) -> tuple[float, float]:
    """Mean distance of the samples' first-frame centroid to the clip's, and of their colour."""
    start = torch.stack([(centroid(s[:, 0]) - centroid(clip[:, 0])).norm() for s in samples]).mean()
    rgb = torch.stack([(colour(s) - colour(clip)).norm() for s in samples]).mean()
    return start.item(), rgb.item()


def run(*args):
    r = subprocess.run([str(flowstep_bin()), "-q", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_lora_makes_the_toy_follow_its_first_frame(tmp_path):
    art = TOY_I2V / "artifacts"
    run("train", "--artifacts", art, "--data", TOY_I2V / "data" / "train", "--out", tmp_path / "train", "--steps", 800,
        "--lr", "3e-3", "--lr-schedule", "cosine:20:0.1", "--seed", 0)
    measured = {"base": [], "lora": []}
    for clip_file in sorted((TOY_I2V / "data" / "eval").glob("*.safetensors")):
        clip = load_file(str(clip_file))["latents"]
        for name, lora in (("base", []), ("lora", ["--lora", tmp_path / "train" / "lora.safetensors"])):
            out = tmp_path / f"{name}-{clip_file.stem}"
            run("sample", "--artifacts", art, "--context", TOY_I2V / "prompts" / "right.safetensors", "--condition", clip_file,
                "--shape", "4,16,16", "--num-samples", 2, "--steps", 30, "--cfg-scale", 1, "--seed", 100, "--out", out, *lora)
            measured[name].append(errors(load_file(str(out / "samples.safetensors"))["latents"], clip))
            # The picture: a row per sample, the given first frame left of the 4 sampled frames
            # (128 px each, 2 px gaps).
            assert Image.open(out / "first_frame.png").size == (5 * 128 + 4 * 2, 2 * 128 + 2)
    (base_start, base_rgb), (lora_start, lora_rgb) = (torch.tensor(measured[n]).mean(0).tolist() for n in ("base", "lora"))
    print(f"first-frame position error {base_start:.2f} -> {lora_start:.2f} px, colour error {base_rgb:.2f} -> {lora_rgb:.2f}")
    # Measured: position 4.9 -> 0.5 latent px, colour 1.0 -> 0.6 (the blob's code is 1.5 on its colour channels).
    assert base_start > 3.0, "the base model must not already follow the first frame"
    assert lora_start < 1.5, f"with the LoRA the videos must start at the first frame's blob: {measured['lora']}"
    assert lora_rgb < 0.75 * base_rgb, f"with the LoRA the colour must come closer to the first frame's: {measured}"
