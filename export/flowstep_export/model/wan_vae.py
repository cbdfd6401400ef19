"""Wan2.1's video VAE from a user's checkpoint, built with DiffSynth-Studio's own classes.

Accepts the original `Wan2.1_VAE.pth` (a torch state dict, keys `encoder.conv1.weight`, ...),
DiffSynth's `model.`-prefixed keys, and ComfyUI's `wan_2.1_vae.safetensors`. The base width
(`dim`, 96 in Wan2.1) and the latent channels (16) are read from the weights' shapes, so a small
random VAE saved the same way loads through the same path (the tests use one).
"""

from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "model."
# Wan2.2's VAE (48 latent channels, DiffSynth's WanVideoVAE38) patchifies its input and decodes
# differently; it is not supported here yet.
WAN21_Z_DIM = 16


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
    """DiffSynth's `WanVideoVAE` holding the weights of `path`, float32, in eval mode."""
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

    state = read_state_dict(path, label)
    try:
        dim = state["encoder.conv1.weight"].shape[0] if "encoder.conv1.weight" in state else state["decoder.head.2.weight"].shape[1]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{path}: not a Wan VAE checkpoint (no tensor {e}; keys start {sorted(state)[:3]})") from None
    except IndexError:
        raise ValueError(f"{path}: not a Wan VAE checkpoint (its first or last convolution weight has too few dims)") from None
    if z_dim != WAN21_Z_DIM:
        raise ValueError(f"{path}: a VAE with {z_dim} latent channels; only the Wan2.1 VAE ({WAN21_Z_DIM} channels) is supported")
    # Shapes are compared on the meta device: `dim` comes from the file and sizes the model.
    with torch.device("meta"):
        target = VideoVAE_(dim=dim, z_dim=z_dim).state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match Wan's VAE (dim {dim}): missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"{path}: tensor `{k}` has shape {list(v.shape)}; Wan's VAE (dim {dim}) expects {list(target[k].shape)}")
    vae = WanVideoVAE(z_dim=z_dim)
    if dim != vae.model.dim:
        vae.model = VideoVAE_(dim=dim, z_dim=z_dim).eval().requires_grad_(False)
    vae.model.load_state_dict({k: v.float() for k, v in state.items()})
    return vae
