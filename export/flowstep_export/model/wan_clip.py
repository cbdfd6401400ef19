"""Wan2.1 I2V's image encoder (the vision tower of open-clip XLM-RoBERTa-large ViT-H/14) from a
user's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, with DiffSynth-Studio's classes.

The file holds the whole CLIP (`visual.*`, `textual.*`, `log_scale`); as DiffSynth's state-dict
converter, only `visual.*` is used (DiffSynth's `model.`-prefixed keys load too). The tower's
sizes (width, layers, MLP width, patch and image size) are read from the weights, so a small
random encoder loads the same way; the head count is ViT-H's 16, which the weights cannot tell.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffsynth.models.wan_video_image_encoder import WanImageEncoder, clip_xlm_roberta_vit_h_14

from .wan_vae import read_state_dict

VISUAL = "visual."
HEADS = 16  # ViT-H/14: 16 heads of 80


class ImageEncoder(WanImageEncoder):
    """DiffSynth's `WanImageEncoder` (its `encode_image`) over a vision tower of the given sizes,
    built on the meta device (its own constructor builds the full ViT-H with random weights)."""

    def __init__(self, sizes: dict):
        torch.nn.Module.__init__(self)
        self.model, self.transforms = clip_xlm_roberta_vit_h_14(pretrained=False, return_transforms=True,
                                                                device="meta", **sizes)
        del self.model.log_scale  # CLIP's text-image temperature: no part of the image features


def load_image_encoder(path: Path, dtype: torch.dtype, label: str | None = None):
    """DiffSynth's `WanImageEncoder` holding the vision weights of `path`, in eval mode."""
    state = read_state_dict(path, label)
    visual = {k[len(VISUAL):]: v for k, v in state.items() if k.startswith(VISUAL)}
    others = sorted(k for k in state if not k.startswith((VISUAL, "textual.")) and k != "log_scale")
    try:
        dim, _, patch, _ = visual["patch_embedding.weight"].shape
        positions = visual["pos_embedding"].shape[1]
        mlp = visual["transformer.0.mlp.0.weight"].shape[0]
        embed_dim = visual["head"].shape[1]
    except KeyError as e:
        raise ValueError(f"{path}: not Wan's CLIP image encoder (no tensor `visual.{e.args[0]}`; keys start "
                         f"{sorted(state)[:3]})") from None
    except (ValueError, IndexError):
        raise ValueError(f"{path}: not Wan's CLIP image encoder (visual.patch_embedding.weight has shape "
                         f"{list(visual['patch_embedding.weight'].shape)}, or another tensor has too few dims)") from None
    grid = math.isqrt(max(positions - 1, 0))
    layers = {int(m.group(1)) for k in visual if (m := re.match(r"transformer\.(\d+)\.", k))}
    if grid < 1 or grid * grid != positions - 1 or dim % HEADS or layers != set(range(len(layers))) or len(layers) < 2:
        raise ValueError(f"{path}: not Wan's CLIP image encoder ({positions} positions, width {dim}, "
                         f"{len(layers)} blocks; expected a square grid plus one, a multiple of {HEADS}, at least 2 blocks)")
    sizes = dict(image_size=grid * patch, patch_size=patch, vision_dim=dim, vision_mlp_ratio=mlp / dim,
                 vision_layers=len(layers), vision_heads=HEADS, embed_dim=embed_dim)
    encoder = ImageEncoder(sizes)
    expected = {k: tuple(v.shape) for k, v in encoder.model.visual.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(visual)), sorted(set(visual) - set(expected)) + others
    if missing or unexpected:
        raise ValueError(f"{path}: does not match Wan's CLIP image encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in visual.items():
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{path}: tensor `visual.{k}` has shape {list(v.shape)}; expected {list(expected[k])}")
    encoder.model.visual.load_state_dict({k: v.to(dtype) for k, v in visual.items()}, assign=True)
    return encoder.eval().requires_grad_(False)
