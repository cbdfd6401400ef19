"""Image-to-video conditioning for `prepare`, as DiffSynth's pipeline units compute it for training
(`WanVideoUnit_ImageEmbedderVAE` and `WanVideoUnit_ImageEmbedderCLIP` in
diffsynth/pipelines/wan_video.py, given `input_image`, which its trainer takes from the clip's
first frame):

  y             [4 + 16, F, H/8, W/8]  a mask (ones on the image's latent frame, zeros after)
                                       stacked on the VAE latents of the image followed by
                                       T-1 black frames (zeros in [-1, 1])
  clip_feature  [257, 1280]            the image through Wan's CLIP ViT-H/14 (bicubic to 224,
                                       CLIP's normalisation, every block but the last)

T is the clip's frame count, H and W its bucket, F = (T-1)/4 + 1 as for its latents. For FLF2V
(first and last frame, DiffSynth's `end_image`) the last of the T frames is the end image and the
mask is 1 on it too; the CLIP features stay the first image's (DiffSynth adds the end image's only
for Wan2.1-FLF2V-14B's DiT, `has_image_pos_emb`).
"""

from __future__ import annotations

import torch

LATENT_SCALE = 8  # the Wan2.1 VAE's spatial compression
TEMPORAL = 4  # ...and temporal: 4 frames per latent frame after the first


def first_frame_mask(frames: int, height: int, width: int, last: bool = False) -> torch.Tensor:
    """[4, F, H/8, W/8]: the latent-frame layout of a per-frame mask that is 1 on frame 0 (and,
    with `last`, on frame T-1). Frame 0 is repeated 4 times, so every latent frame stands for 4
    frames; channel i of latent frame f is frame 4f+i-3's mask."""
    mask = torch.zeros(frames + TEMPORAL - 1, height // LATENT_SCALE, width // LATENT_SCALE)
    mask[:TEMPORAL] = 1
    if last:
        mask[-1] = 1
    return mask.view(-1, TEMPORAL, height // LATENT_SCALE, width // LATENT_SCALE).transpose(0, 1)


@torch.no_grad()
def encode_y(vae, image: torch.Tensor, frames: int, device: str, end_image: torch.Tensor | None = None) -> torch.Tensor:
    """`y` for a clip of `frames` frames whose first frame is `image` [3, H, W] in [-1, 1] (and
    whose last is `end_image`, for FLF2V)."""
    _, height, width = image.shape
    ends = [] if end_image is None else [end_image[:, None]]
    video = torch.cat([image[:, None], image.new_zeros(3, frames - 1 - len(ends), height, width), *ends], dim=1)
    latents = vae.encode([video], device=device)[0]
    return torch.cat([first_frame_mask(frames, height, width, last=end_image is not None).to(latents), latents])


@torch.no_grad()
def encode_clip(encoder, image: torch.Tensor, device: str) -> torch.Tensor:
    """`clip_feature` [tokens, width] of `image` [3, H, W] in [-1, 1]."""
    return encoder.encode_image([image[None].to(device)])[0]
