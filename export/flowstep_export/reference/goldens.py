"""Golden inputs and outputs for the Rust regression tests, computed by PyTorch.

python -m flowstep_export.reference.goldens --artifacts models/tiny/artifacts --out models/tiny/golden.safetensors

- `step.*`: one training-graph call (fixed LoRA, latents, timestep, context, target,
  weight) with the loss and flat gradient from eager autograd.
- `loop.*`: three SFT steps of a PyTorch reference loop (torch.optim.AdamW over the LoRA
  tensors, DiffSynth's loss) with the exact x_t, target, timestep and weight each step used,
  the loss and grad norm per step and the flat parameters after each step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model.configs import get_config
from ..model.lora import LoraConfig, inject_lora
from ..model.model import WanModel
from ..pipeline.steps import LoraTensor, sft_loss

LOOP_STEPS = 3
LOOP_HPARAMS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "shift": 5.0}


def load_model(artifacts: Path):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    config = get_config(manifest["model"]["name"])
    lora = manifest["lora"]
    model = WanModel(config)
    inject_lora(model, LoraConfig(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"])))
    base = load_file(str(artifacts / manifest["base_weights"]["file"]))
    init = load_file(str(artifacts / "lora_init.safetensors"))
    model.load_state_dict({**base, **init}, strict=True)
    layout = [LoraTensor(t["key"], tuple(t["shape"]), t["offset"]) for t in lora["tensors"]]
    return config, model, layout


def flat_params(model, layout) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[t.key].detach().reshape(-1) for t in layout])


def flat_grads(model, layout) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[t.key].grad.reshape(-1) for t in layout])


def make_goldens(artifacts: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    from .scheduler_ref import training_schedule

    config, model, layout = load_model(artifacts)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_params = [dict(model.named_parameters())[t.key] for t in layout]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0 so every LoRA tensor has a gradient
        for t in layout:
            if ".lora_B." in t.key:
                dict(model.named_parameters())[t.key].copy_(0.02 * torch.randn(t.shape, generator=g))
    out: dict[str, torch.Tensor] = {}
    frames, height, width = 3, 8, 8
    x_t = torch.randn((1, config.in_dim, frames, height, width), generator=g)
    context = torch.randn((1, config.text_len, config.text_dim), generator=g)
    target = torch.randn((1, config.out_dim, frames, height, width), generator=g)
    timestep, weight = torch.tensor([833.3333]), torch.tensor(1.0248619)
    for p in lora_params:
        p.requires_grad_(True)
    loss = sft_loss(model(x_t, timestep, context), target, weight)
    loss.backward()
    out.update({"step.lora_params": flat_params(model, layout), "step.x_t": x_t, "step.timestep": timestep,
                "step.context": context, "step.target": target, "step.weight": weight,
                "step.loss": loss.detach(), "step.grad": flat_grads(model, layout)})

    # The reference loop: DiffSynth's FlowMatchSFTLoss + AdamW, 3 steps, one sample.
    sigmas, timesteps, weights = training_schedule(1000, LOOP_HPARAMS["shift"])
    x0 = torch.randn((config.in_dim, 2, 8, 8), generator=g)
    loop_context = torch.randn((config.text_len, config.text_dim), generator=g)
    for p in lora_params:
        p.grad = None
    optimizer = torch.optim.AdamW(lora_params, lr=LOOP_HPARAMS["lr"], betas=(LOOP_HPARAMS["beta1"], LOOP_HPARAMS["beta2"]),
                                  eps=LOOP_HPARAMS["eps"], weight_decay=LOOP_HPARAMS["weight_decay"], foreach=False)
    out["loop.x0"], out["loop.context"], out["loop.params_init"] = x0, loop_context, flat_params(model, layout)
    for step in range(LOOP_STEPS):
        index = int(torch.randint(0, 1000, (1,), generator=g))
        noise = torch.randn(x0.shape, generator=g)
        sigma, t, w = sigmas[index], timesteps[index:index + 1], weights[index]
        x_t = (1 - sigma) * x0 + sigma * noise
        target = noise - x0
        optimizer.zero_grad()
        loss = sft_loss(model(x_t[None], t, loop_context[None]), target[None], w)
        loss.backward()
        grad_norm = flat_grads(model, layout).norm()
        optimizer.step()
        out.update({f"loop.{step}.x_t": x_t, f"loop.{step}.target": target, f"loop.{step}.timestep": t.clone(),
                    f"loop.{step}.weight": w.clone(), f"loop.{step}.loss": loss.detach(),
                    f"loop.{step}.grad_norm": grad_norm, f"loop.{step}.params": flat_params(model, layout)})
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.reference.goldens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    from ..pipeline.validate import stock_reference

    with stock_reference():  # PyTorch's own softmax attention, not the operator pair under test
        goldens = make_goldens(args.artifacts)
    save_file(goldens, str(args.out), metadata={k: str(v) for k, v in LOOP_HPARAMS.items()})
    print(f"wrote {len(goldens)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
