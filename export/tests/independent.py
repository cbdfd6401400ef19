"""Helpers for tests that check flowstep against references written independently of
flowstep_export's model, LoRA, step and loss code: DiffSynth-Studio's own WanModel and
FlowMatchScheduler, PEFT's LoRA (as DiffSynth injects it), torch.optim, plain numpy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "tiny" / "artifacts"


def flowstep_bin() -> Path:
    path = Path(os.environ.get("FLOWSTEP_BIN", ROOT / "target" / "release" / "flowstep"))
    if not path.exists():
        if "FLOWSTEP_BIN" in os.environ:
            pytest.fail(f"FLOWSTEP_BIN={path} does not exist")
        pytest.skip("flowstep binary not built (scripts/test.sh builds it)")
    return path


def flowstep(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(flowstep_bin()), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cpu_flags() -> set[str]:
    """This CPU's flags as the kernel reports them (/proc/cpuinfo), whatever CPUID is told to hide."""
    info = Path("/proc/cpuinfo").read_text()
    return set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))


# Runs a command with AVX-512 hidden from CPUID, so that every library takes its AVX2 paths.
AVX2_ONLY = str(ROOT / "scripts" / "avx2_only.sh")


def skip_unless_avx512_can_be_hidden() -> None:
    """Skips a test of the AVX2 paths through AVX2_ONLY where it has nothing to hide or cannot."""
    flags = cpu_flags()
    if "avx512f" not in flags or "avx2" not in flags:
        pytest.skip("the AVX2 path is the native one on a host without AVX-512")
    if "cpuid_fault" not in flags:
        pytest.skip("no CPUID faulting here: AVX-512 cannot be hidden")


def avx512_hidden(stderr: str) -> int:
    """The most CPUID answers one process run with AVX2_ONLY_REPORT=1 reported masking (0: none)."""
    return max((int(line.split()[-4]) for line in stderr.splitlines() if line.startswith("avx2_only:")), default=0)


def manifest(artifacts: Path) -> dict:
    return json.loads((artifacts / "manifest.json").read_text())


def diffsynth_flags(model: dict) -> dict:
    """DiffSynth WanModel's variant flags for a manifest's model section, as DiffSynth's
    configs/model_configs.py sets them: Wan2.1 I2V (has_image_input: CLIP tokens and `y`),
    Wan2.2 I2V-A14B (`y` only: require_clip_embedding False), Wan2.2 TI2V-5B."""
    names = [c["name"] for c in model.get("conditioning", [])]
    if model["variant"] == "ti2v":
        return dict(has_image_input=False, seperated_timestep=True, require_clip_embedding=False,
                    require_vae_embedding=False, fuse_vae_embedding_in_latents=True)
    if model["variant"] == "i2v":
        return dict(has_image_input="clip_feature" in names, require_clip_embedding="clip_feature" in names)
    return dict(has_image_input=False)


def diffsynth_base(artifacts: Path):
    """DiffSynth's WanModel with the artifacts' base weights."""
    from diffsynth.models.wan_video_dit import WanModel

    m = manifest(artifacts)["model"]
    dit = WanModel(dim=m["dim"], in_dim=m["in_dim"], ffn_dim=m["ffn_dim"], out_dim=m["out_dim"], text_dim=m["text_dim"],
                   freq_dim=m["freq_dim"], eps=m["eps"], patch_size=tuple(m["patch_size"]), num_heads=m["num_heads"],
                   num_layers=m["num_layers"], **diffsynth_flags(m))
    dit.load_state_dict(load_file(str(artifacts / "base.safetensors")))
    return dit


def diffsynth_peft(artifacts: Path, lora: dict[str, torch.Tensor] | None = None, alpha: float | None = None):
    """DiffSynth's WanModel + PEFT LoRA (rank/targets from the manifest; alpha the run's
    `--lora-alpha`, else the manifest's), as DiffSynth's training module injects it; LoRA
    tensors from `lora` (DiffSynth keys) or lora_init."""
    import peft

    info = manifest(artifacts)["lora"]
    dit = diffsynth_base(artifacts)
    lora_alpha = info["alpha"] if alpha is None else alpha
    dit = peft.inject_adapter_in_model(
        peft.LoraConfig(r=info["rank"], lora_alpha=lora_alpha, target_modules=info["targets"]), dit)
    state = lora if lora is not None else load_file(str(artifacts / "lora_init.safetensors"))
    result = dit.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    dit.requires_grad_(False)
    return dit


def unflatten(artifacts: Path, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {t["key"]: flat[t["offset"]:t["offset"] + int(torch.tensor(t["shape"]).prod())].reshape(t["shape"]).clone()
            for t in manifest(artifacts)["lora"]["tensors"]}


def flatten(artifacts: Path, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[t["key"]].detach().reshape(-1).float() for t in manifest(artifacts)["lora"]["tensors"]])


def velocity(dit, x_t, timestep, context, **conditioning):
    """DiffSynth's model_fn_wan_video; TI2V's first_frame_latents go into frame 0 and switch on
    its per-token timesteps, as DiffSynth's pipeline and FlowMatchSFTLoss do."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    if "first_frame_latents" in conditioning:
        x_t = x_t.clone()
        x_t[:, :, 0:1] = conditioning.pop("first_frame_latents")
        conditioning["fuse_vae_embedding_in_latents"] = True
    return model_fn_wan_video(dit, latents=x_t, timestep=timestep, context=context, **conditioning)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's tensors (float32 parameters and AdamW moments)."""
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "state.safetensors"))
