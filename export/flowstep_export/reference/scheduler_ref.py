"""DiffSynth-Studio's FlowMatchScheduler (Wan template) in torch: the reference the Rust
scheduler is tested against (tests/golden/schedule_*.csv) and the PyTorch reference loop uses."""

from __future__ import annotations

import torch


def training_schedule(num_steps: int = 1000, shift: float = 5.0, denoising_strength: float = 1.0):
    """(sigmas, timesteps, weights) exactly as `set_timesteps_wan` + `set_training_weight`."""
    sigma_min, sigma_max = 0.0, 1.0
    sigma_start = sigma_min + (sigma_max - sigma_min) * denoising_strength
    sigmas = torch.linspace(sigma_start, sigma_min, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    steps = 1000
    x = sigmas * 1000
    y = torch.exp(-2 * ((x - steps / 2) / steps) ** 2)
    y_shifted = y - y.min()
    weights = y_shifted * (steps / y_shifted.sum())
    if len(timesteps) != 1000:
        weights = weights * (len(timesteps) / steps)
        weights = weights + weights[1]
    return sigmas, timesteps, weights
