"""Image-to-video conditioning for `prepare`, as DiffSynth's pipeline units compute it for training
(`WanVideoUnit_ImageEmbedderVAE` and `WanVideoUnit_ImageEmbedderCLIP` in
diffsynth/pipelines/wan_video.py, given `input_image`, which its trainer takes from the clip's
first frame):

  y             [4 + 16, F, H/8, W/8]  a mask (ones on the image's latent frame, zeros after)
                                       stacked on the VAE latents of the image followed by
                                       T-1 black frames (zeros in [-1, 1])
  clip_feature  [257, 1280]            the image through Wan's CLIP ViT-H/14 (bicubic to 224,
                                       CLIP's normalisation, every block but the last)

T is the clip's frame count, H and W its bucket, F = (T-1)/4 + 1 as for its latents.
"""

from __future__ import annotations

import torch

LATENT_SCALE = 8  # the Wan2.1 VAE's spatial compression
TEMPORAL = 4  # ...and temporal: 4 frames per latent frame after the first


def first_frame_mask(frames: int, height: int, width: int) -> torch.Tensor:
    """[4, F, H/8, W/8]: the latent-frame layout of a per-frame mask that is 1 on frame 0 only.
    Frame 0 is repeated 4 times, so every latent frame stands for 4 frames; channel i of latent
    frame f is frame 4f+i-3's mask."""
    mask = torch.zeros(frames + TEMPORAL - 1, height // LATENT_SCALE, width // LATENT_SCALE)
    mask[:TEMPORAL] = 1
    return mask.view(-1, TEMPORAL, height // LATENT_SCALE, width // LATENT_SCALE).transpose(0, 1)


@torch.no_grad()
def encode_y(vae, image: torch.Tensor, frames: int, device: str) -> torch.Tensor:
    """`y` for a clip of `frames` frames whose first frame is `image` [3, H, W] in [-1, 1]."""
    _, height, width = image.shape
    video = torch.cat([image[:, None], image.new_zeros(3, frames - 1, height, width)], dim=1)
    latents = vae.encode([video], device=device)[0]
    return torch.cat([first_frame_mask(frames, height, width).to(latents), latents])


@torch.no_grad()
def encode_clip(encoder, image: torch.Tensor, device: str) -> torch.Tensor:
    """`clip_feature` [tokens, width] of `image` [3, H, W] in [-1, 1]."""
    return encoder.encode_image([image[None].to(device)])[0]
