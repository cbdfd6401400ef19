"""The toy world's image-to-video variant, for the demo's second job: a LoRA that teaches the
toy Wan to continue a given first frame.

- The model is toy-i2v: the toy with `y` [4 + 16, F, H, W] concatenated to its latents, as
  Wan2.2 I2V-A14B takes it (no CLIP): a mask that is 1 on latent frame 0, stacked on the first
  frame's latents followed by zeros (the toy's "VAE" is the identity, a black frame is zero).
- Its base is the pretrained toy's, with the patch embedding widened to 36 input channels: the
  new `y` columns are seeded random weights at the scale of the latent ones, so `y` reaches the
  blocks but the base has never learned to use it.
- A clip is a toy blob of any pretraining colour moving right from a random start; the prompt
  says only "right" (no colour word), so colour and place can only come from the first frame.
  The LoRA trains on 16 clips; 4 clips with other starts (another seed) are held out, and their
  first frames are what the demo samples from.

python -m flowstep_export.data.toy_i2v --toy-base ../models/toy/artifacts/base.safetensors --out ../models/toy-i2v
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model.configs import get_config
from . import toy_world
from .toy_world import CHANNELS, COLOURS, FRAMES, SIZE, TEXT_DIM, TEXT_LEN

MOTION = "right"
MASK_CHANNELS = 4  # Wan's y: a 4-channel mask (one per frame of a latent frame) before the image latents


def i2v_base(toy_base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The toy's weights with `y` columns added to the patch embedding (Wan's in_dim 16 -> 36)."""
    weight = toy_base["patch_embedding.weight"]  # [dim, 16, 1, 2, 2]
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(weight.shape[0], MASK_CHANNELS + CHANNELS, *weight.shape[2:], generator=g) * weight.std()
    return {**toy_base, "patch_embedding.weight": torch.cat([weight, extra], dim=1).contiguous()}


def y_of(latents: torch.Tensor) -> torch.Tensor:
    """`y` [4 + C, F, H, W] for a clip: the mask on latent frame 0 and the first frame's latents."""
    y = torch.zeros(MASK_CHANNELS + CHANNELS, *latents.shape[1:])
    y[:MASK_CHANNELS, 0] = 1
    y[MASK_CHANNELS:, 0] = latents[:, 0]
    return y


def prompt() -> torch.Tensor:
    """The motion word alone: the colour row is empty."""
    ctx = toy_world.context(COLOURS[0], MOTION)
    ctx[0] = 0
    return ctx


def write_dataset(out: Path, colours: list[str], seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, colour in enumerate(colours):
        latents = toy_world.video(colour, MOTION, g)
        save_file({"latents": latents.contiguous(), "context": prompt().contiguous(), "y": y_of(latents).contiguous()},
                  str(out / f"{i:03d}-{colour}-{MOTION}.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.data.toy_i2v", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-base", type=Path, required=True, help="the pretrained toy's base.safetensors")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base.safetensors"
    save_file(i2v_base(load_file(str(args.toy_base)), args.seed), str(base))
    write_dataset(args.out / "data" / "train", [c for c in COLOURS for _ in range(3)] + ["red"], seed=11)
    # Held out: four of the colours, from starts drawn with another seed.
    write_dataset(args.out / "data" / "eval", ["cyan", "yellow", "blue", "green"], seed=12)
    (args.out / "prompts").mkdir(exist_ok=True)
    save_file({"context": prompt().contiguous()}, str(args.out / "prompts" / f"{MOTION}.safetensors"))
    from ..model.lora import LoraConfig
    from ..pipeline.export import ExportOptions, export_artifacts

    logging.basicConfig(level=logging.WARNING)
    export_artifacts(get_config("toy-i2v"), ExportOptions(out=args.out / "artifacts", base=base, lora=LoraConfig(rank=16),
                                                          ship_base=True, seed=args.seed))
    base.unlink()  # shipped inside artifacts/
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
