"""A toy world of "latent videos" the toy Wan can learn on a CPU: a coloured blob moving
through a 16-channel latent grid, with colour and motion set by the text embedding.

- A video is [16, F=4, H=16, W=16]: a Gaussian blob (σ = 1.5 latent px) whose channel
  vector is its colour code; it starts at a random place and moves 3 px per frame.
- The text embedding [16, 64] holds a colour token (row 0) and a motion token (row 1),
  fixed random vectors per word; the other rows are zero.
- The base model is pretrained on {red, green, blue, yellow, cyan} × {right, down, left, up}.
  The concept to teach is a new colour word, "purple" (red + blue channels): its token is
  never seen in pretraining. The LoRA learns it from purple blobs moving right, down and
  left; "purple up" is held out.

python -m flowstep_export.data.toy_world --out ../models/toy   (pretrain, export, datasets)
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.configs import get_config
from ..model.model import WanModel, init_random

CHANNELS, FRAMES, SIZE = 16, 4, 16
TEXT_LEN, TEXT_DIM = 16, 64
SPEED = 3.0
BLOB_SIGMA = 1.8
RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
       "cyan": (0.0, 1.0, 1.0), "purple": (1.0, 0.0, 1.0)}
COLOURS = ("red", "green", "blue", "yellow", "cyan")
CONCEPT = "purple"
MOTIONS = {"right": (1.0, 0.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "up": (0.0, -1.0)}


def colour_code(name: str) -> torch.Tensor:
    """A 16-channel code: channels 0-2 are RGB (so the renderer shows it), the rest a
    fixed latent-like pattern."""
    rgb = RGB[name]
    g = torch.Generator().manual_seed(100 + list(RGB).index(name))
    code = torch.randn(CHANNELS, generator=g) * 0.35
    code[:3] = torch.tensor(rgb) * 1.5
    return code


def word_token(word: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, word)) * 7919)
    return torch.randn(TEXT_DIM, generator=g)


def context(colour: str, motion: str) -> torch.Tensor:
    ctx = torch.zeros(TEXT_LEN, TEXT_DIM)
    ctx[0] = word_token(colour)
    ctx[1] = word_token("motion:" + motion)
    return ctx


def start_range(v: float) -> tuple[float, float]:
    travel = SPEED * (FRAMES - 1)
    lo, hi = 2.5, SIZE - 3.5
    if v > 0:
        return lo, hi - travel
    if v < 0:
        return lo + travel, hi
    return lo, hi


def video(colour: str, motion: str, generator: torch.Generator) -> torch.Tensor:
    vx, vy = MOTIONS[motion]
    x0 = torch.empty(1).uniform_(*start_range(vx), generator=generator).item()
    y0 = torch.empty(1).uniform_(*start_range(vy), generator=generator).item()
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    frames = []
    for f in range(FRAMES):
        cx, cy = x0 + vx * SPEED * f, y0 + vy * SPEED * f
        mask = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * BLOB_SIGMA**2))
        frames.append(colour_code(colour)[:, None, None] * mask[None])
    return torch.stack(frames, dim=1)  # [C, F, H, W]


def motion_of(latents: torch.Tensor) -> tuple[float, float]:
    """(dx, dy) of the blob's intensity centroid from the first to the last frame."""
    intensity = latents.float().pow(2).sum(0)  # [F, H, W]
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    cents = []
    for f in (0, intensity.shape[0] - 1):
        w = intensity[f] / intensity[f].sum().clamp_min(1e-8)
        cents.append(((w * xs).sum().item(), (w * ys).sum().item()))
    return cents[1][0] - cents[0][0], cents[1][1] - cents[0][1]


def pretrain(steps: int, seed: int, log_every: int = 200) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(get_config("toy"))
    init_random(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    g = torch.Generator().manual_seed(seed)
    pairs = [(c, m) for c in COLOURS for m in MOTIONS]
    batch = 16
    start = time.time()
    for step in range(steps):
        x0, ctx = [], []
        for _ in range(batch):
            c, m = pairs[int(torch.randint(len(pairs), (1,), generator=g))]
            x0.append(video(c, m, g))
            ctx.append(context(c, m))
        x0, ctx = torch.stack(x0), torch.stack(ctx)
        # Pretraining draws σ uniformly (not the shift-5 table) so the low-noise end, where
        # samples get their last detail, is learned as well as the high-noise end.
        sigma = torch.rand(batch, generator=g).clamp(1e-3, 1.0)
        noise = torch.randn(x0.shape, generator=g)
        s5 = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s5) * x0 + s5 * noise
        v = model(x_t, sigma * 1000, ctx)  # the PyTorch model takes a timestep per sample
        loss = torch.mean((v - (noise - x0)) ** 2)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"pretrain step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    return model


def write_dataset(out: Path, items: list[tuple[str, str]], seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, (c, m) in enumerate(items):
        save_file({"latents": video(c, m, g).contiguous(), "context": context(c, m).contiguous()},
                  str(out / f"{i:03d}-{c}-{m}.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.data.toy_world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2500, help="pretraining steps (batch 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = pretrain(args.steps, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(args.out / "base.safetensors"))
    # The concept: purple moving right, down and left for training; "purple up" held out.
    write_dataset(args.out / "data" / "train", [(CONCEPT, m) for m in ("right", "down", "left") for _ in range(4)], seed=1)
    write_dataset(args.out / "data" / "eval", [(CONCEPT, "up")] * 2 + [(CONCEPT, "right"), (CONCEPT, "left")], seed=2)
    prompts = args.out / "prompts"
    prompts.mkdir(exist_ok=True)
    for name, ctx in {"purple-up": context(CONCEPT, "up"), "yellow-up": context("yellow", "up"),
                      "empty": torch.zeros(TEXT_LEN, TEXT_DIM)}.items():
        save_file({"context": ctx.contiguous()}, str(prompts / f"{name}.safetensors"))
    from ..pipeline.export import ExportOptions, export_artifacts
    from ..model.lora import LoraConfig

    logging.basicConfig(level=logging.WARNING)
    export_artifacts(get_config("toy"), ExportOptions(out=args.out / "artifacts", base=args.out / "base.safetensors",
                                                       lora=LoraConfig(rank=16), ship_base=True, seed=args.seed))
    (args.out / "base.safetensors").unlink()  # shipped inside artifacts/
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
