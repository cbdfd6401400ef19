"""The PyTorch reference: DiffSynth-Studio's Wan LoRA training loop in eager PyTorch.

DiffSynth's own `WanModel` and `model_fn_wan_video` (SDPA attention), LoRA injected with
PEFT exactly as DiffSynth does, its `FlowMatchScheduler("Wan")` and the FlowMatchSFTLoss
math (timestep index ~ U{0..N-1}, ε ~ N(0, I), x_t = (1-σ)x0 + σε, target = ε - x0,
loss = w(t)·MSE), torch.optim.AdamW. Float32 by default (flowstep's default precision) or bf16 base
weights and activations (`--precision bfloat16`, LoRA and AdamW float32 as in flowstep); the
same base weights, LoRA init and data as a flowstep run on the same artifacts.

python -m flowstep_export.reference.reference_train --artifacts DIR --data DIR --steps N [--threads T]
prints one JSON object: seconds per step (after warm-up), steps/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def build_torch(artifacts: Path, base_file: Path | None, device: str, dtype: torch.dtype):
    """flowstep_export's Wan modules (equal to DiffSynth's, see export/tests) with SDPA and
    PEFT-equivalent LoRA: for machines without DiffSynth installed (the GPU machine)."""
    from ..model import model as wan
    from ..model.configs import get_config
    from ..model.lora import LoraConfig, inject_lora

    manifest = json.loads((artifacts / "manifest.json").read_text())
    lora = manifest["lora"]
    wan.ATTENTION = "sdpa"
    wan.POINTWISE = "stock"
    dit = wan.WanModel(get_config(manifest["model"]["name"]))
    inject_lora(dit, LoraConfig(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"])))
    base = load_file(str(base_file or artifacts / manifest["base_weights"]["file"]))
    init = load_file(str(artifacts / "lora_init.safetensors"))
    dit.load_state_dict({**{k.removeprefix("model."): v for k, v in base.items()}, **init})
    del base
    dit.requires_grad_(False)
    params = [p for n, p in dit.named_parameters() if "lora_" in n]
    for n, p in dit.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(dtype)
    for p in params:
        p.requires_grad_(True)

    def forward(latents, timestep, context, use_gradient_checkpointing=False):
        dit.gradient_checkpointing = use_gradient_checkpointing
        return dit(latents, timestep, context)

    return dit.to(device), params, forward


def build(artifacts: Path, base_file: Path | None, device: str, dtype: torch.dtype):
    import peft
    from diffsynth.models.wan_video_dit import WanModel

    manifest = json.loads((artifacts / "manifest.json").read_text())
    m, lora = manifest["model"], manifest["lora"]
    dit = WanModel(dim=m["dim"], in_dim=m["in_dim"], ffn_dim=m["ffn_dim"], out_dim=m["out_dim"], text_dim=m["text_dim"],
                   freq_dim=m["freq_dim"], eps=m["eps"], patch_size=tuple(m["patch_size"]), num_heads=m["num_heads"],
                   num_layers=m["num_layers"], has_image_input=False)
    base = load_file(str(base_file or artifacts / manifest["base_weights"]["file"]))
    dit.load_state_dict({k.removeprefix("model."): v for k, v in base.items()})
    del base
    dit.to(dtype)  # the base in DiffSynth's training dtype; the LoRA stays float32 below
    dit = peft.inject_adapter_in_model(peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=lora["targets"]), dit)
    init = load_file(str(artifacts / "lora_init.safetensors"))
    missing = dit.load_state_dict(init, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    dit.requires_grad_(False)
    params = []
    for name, p in dit.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params.append(p)
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    def forward(latents, timestep, context, use_gradient_checkpointing=False):
        return model_fn_wan_video(dit, latents=latents, timestep=timestep, context=context,
                                  use_gradient_checkpointing=use_gradient_checkpointing)

    return dit.to(device), params, forward


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.reference.reference_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--base", type=Path, help="base weights when the artifacts ship none")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gradient-checkpointing", action="store_true", help="DiffSynth's use_gradient_checkpointing")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="base weights and activations (LoRA parameters and AdamW stay float32, as in flowstep)")
    p.add_argument("--impl", choices=("diffsynth", "torch"), default="diffsynth",
                   help="diffsynth: DiffSynth's WanModel + PEFT; torch: flowstep_export's equal modules (no DiffSynth needed)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .scheduler_ref import training_schedule

    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.precision]
    dit, params, forward = (build if args.impl == "diffsynth" else build_torch)(args.artifacts, args.base, args.device, dtype)
    sigmas, timesteps, weights = training_schedule(1000, 5.0)
    samples = [load_file(str(f)) for f in sorted(args.data.glob("*.safetensors"))]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    times, losses = [], []
    for step in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample = samples[step % len(samples)]
        x0 = sample["latents"].float()[None].to(args.device)
        context = sample["context"].to(dtype)[None].to(args.device)
        # FlowMatchSFTLoss (DiffSynth's scheduler tables; equality tested in export/tests).
        timestep_id = int(torch.randint(0, len(timesteps), (1,)))
        timestep = timesteps[timestep_id:timestep_id + 1].to(args.device)
        noise = torch.randn_like(x0)
        sigma = float(sigmas[timestep_id])
        x_t = (1 - sigma) * x0 + sigma * noise
        target = noise - x0
        velocity = forward(x_t.to(dtype), timestep, context, use_gradient_checkpointing=args.gradient_checkpointing)
        loss = torch.nn.functional.mse_loss(velocity.float(), target.float()) * weights[timestep_id].to(args.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # also a device sync
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    sec = sum(times) / max(len(times), 1)
    report = {"seconds_per_step": sec, "steps_per_second": 1 / sec if sec else 0.0, "steps": args.steps,
              "timed_steps": len(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "threads": torch.get_num_threads(), "final_loss": losses[-1] if losses else None}
    if args.device.startswith("cuda"):
        report["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
