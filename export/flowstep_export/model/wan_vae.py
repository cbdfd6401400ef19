"""Wan's video VAEs from a user's checkpoint, built with DiffSynth-Studio's own classes.

Two VAEs, told apart by their latent channels:

  Wan2.1 (16 channels, 8× spatial): `Wan2.1_VAE.pth`, ComfyUI's `wan_2.1_vae.safetensors`;
      DiffSynth's `WanVideoVAE`. Wan2.1 T2V/I2V and Wan2.2 A14B.
  Wan2.2 (48 channels, 16× spatial: a 2×2 patchify around an 8× VAE): `Wan2.2_VAE.pth`,
      ComfyUI's `wan2.2_vae.safetensors`; DiffSynth's `WanVideoVAE38`. Wan2.2 TI2V-5B.

Both accept the original keys (`encoder.conv1.weight`, ...) and DiffSynth's `model.`-prefixed
ones. The widths (Wan2.1: `dim` 96; Wan2.2: encoder `dim` 160, decoder `dec_dim` 256) are read
from the weights' shapes, so a small random VAE saved the same way loads through the same path
(the tests use one).
"""

from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "model."
WAN21_Z_DIM, WAN22_Z_DIM = 16, 48
VAE_NAMES = {WAN21_Z_DIM: "Wan2.1", WAN22_Z_DIM: "Wan2.2"}


def read_state_dict(path: Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch (.pth/.pt/.ckpt) checkpoint, `model.` prefix removed;
    torch files unpickled with `weights_only`. `label` (e.g. `--vae PATH`) names it in errors."""
    from ..files import check_tensor_storage, load_safetensors_file, load_torch_file, require_regular_file

    require_regular_file(path, label)
    if path.suffix == ".safetensors":
        state = load_safetensors_file(path)
    else:
        state = load_torch_file(path)
        if isinstance(state, dict) and isinstance(state.get("model_state"), dict):
            state = state["model_state"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict of tensors")
    for k, v in state.items():
        check_tensor_storage(path, k, v)
    if all(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items()}
    return state


def load_vae(path: Path, label: str | None = None):
    """DiffSynth's `WanVideoVAE` (Wan2.1) or `WanVideoVAE38` (Wan2.2) holding the weights of
    `path`, float32, in eval mode; which one by the latent channels of its weights."""
    from diffsynth.core.vram import skip_model_initialization
    from diffsynth.models.wan_video_vae import VideoVAE38_, VideoVAE_, WanVideoVAE, WanVideoVAE38

    state = read_state_dict(path, label)
    try:
        dim = state["encoder.conv1.weight"].shape[0]
        dec_dim = state["decoder.head.2.weight"].shape[1]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{path}: not a Wan VAE checkpoint (no tensor {e}; keys start {sorted(state)[:3]})") from None
    except IndexError:
        raise ValueError(f"{path}: not a Wan VAE checkpoint (its first or last convolution weight has too few dims)") from None
    if z_dim not in VAE_NAMES:
        raise ValueError(f"{path}: a VAE with {z_dim} latent channels; flowstep reads the Wan2.1 VAE ({WAN21_Z_DIM}) "
                         f"and the Wan2.2 VAE ({WAN22_Z_DIM})")
    name, wan22 = VAE_NAMES[z_dim], z_dim == WAN22_Z_DIM
    widths = f"dim {dim}, dec_dim {dec_dim}" if wan22 else f"dim {dim}"
    # Built without initialising (DiffSynth's own loader does the same): the widths come from
    # the file, and the weights are its tensors.
    with skip_model_initialization():
        if wan22:
            vae = WanVideoVAE38(z_dim=z_dim, dim=dim)
            vae.model = VideoVAE38_(dim=dim, dec_dim=dec_dim, z_dim=z_dim)
        else:
            vae = WanVideoVAE(z_dim=z_dim)
            vae.model = VideoVAE_(dim=dim, z_dim=z_dim)
    target = vae.model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the {name} VAE ({widths}): missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{path}: tensor `{k}` has shape {list(v.shape)}; the {name} VAE ({widths}) expects {list(target[k].shape)}")
    vae.model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    vae.model.eval().requires_grad_(False)
    return vae


def vae_name(vae) -> str:
    """`Wan2.1` or `Wan2.2`, for messages and manifests."""
    return VAE_NAMES[vae.z_dim]
