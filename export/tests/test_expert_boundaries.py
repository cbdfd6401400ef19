"""Wan2.2 expert timestep boundaries in DiffSynth's units (fractions of the training table):
flowstep draws from exactly the index range DiffSynth's own FlowMatchSFTLoss draws from,
with the boundaries given as flags, taken from an expert's manifest, or stored in a
converted DiffSynth cache; and those ranges are the timesteps the issue names
(0.417 -> t >= 875 for T2V-A14B, 0.358 -> t >= 900 for I2V-A14B)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from independent import ROOT, TINY, flowstep

A14B = ROOT / "models" / "tiny-a14b"
MICRO_STEPS = 300


def diffsynth_range(lo: float, hi: float) -> tuple[int, int]:
    """The (low, high) that DiffSynth's FlowMatchSFTLoss passes to torch.randint."""
    from diffsynth.diffusion import loss as diffsynth_loss
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(1000, training=True)
    pipe = SimpleNamespace(scheduler=scheduler, torch_dtype=torch.float32, device="cpu", in_iteration_models=(),
                           model_fn=lambda latents, **_: torch.zeros_like(latents))
    calls = []
    real = torch.randint

    def randint(low, high, size, **kw):
        calls.append((low, high))
        return real(low, high, size, **kw)

    with mock.patch.object(diffsynth_loss.torch, "randint", randint):
        diffsynth_loss.FlowMatchSFTLoss(pipe, input_latents=torch.zeros(1, 16, 1, 2, 2), context=None,
                                        min_timestep_boundary=lo, max_timestep_boundary=hi)
    (call,) = calls
    return call


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(16, 2, 4, 4, generator=g), "context": torch.randn(16, 64, generator=g)},
              str(d / "0.safetensors"))
    return d


def draws(tmp_path, artifacts, data, *flags):
    out = tmp_path / "draws.safetensors"
    flowstep("draws", "--artifacts", artifacts, "--data", data, "--out", out, "--micro-steps", MICRO_STEPS, *flags)
    d = load_file(str(out))
    declared = tuple(int(v) for v in d["timestep_range"])
    index = d["timestep_index"].long()
    assert declared[0] <= int(index.min()) and int(index.max()) < declared[1], "a draw outside the declared range"
    return declared, d["timestep"]


@pytest.mark.parametrize("lo,hi", [(0.0, 0.417), (0.417, 1.0), (0.0, 0.358), (0.358, 1.0), (0.1, 0.9)])
def test_flags_draw_diffsynths_index_range(tmp_path, data, lo, hi):
    want = diffsynth_range(lo, hi)
    declared, _ = draws(tmp_path, TINY, data, "--min-timestep-boundary", lo, "--max-timestep-boundary", hi)
    assert declared == want


@pytest.mark.parametrize("role,lo,hi", [("high_noise", 0.0, 0.417), ("low_noise", 0.417, 1.0)])
def test_expert_default_comes_from_its_manifest(tmp_path, data, role, lo, hi):
    art = A14B / role / "artifacts"
    expert = json.loads((art / "manifest.json").read_text())["expert"]
    assert (expert["role"], expert["min_timestep_boundary"], expert["max_timestep_boundary"]) == (role, lo, hi)
    declared, timesteps = draws(tmp_path, art, data)
    assert declared == diffsynth_range(lo, hi)
    # T2V-A14B's switch: the high-noise expert sees exactly the timesteps >= 875.
    assert bool((timesteps >= 875).all()) == (role == "high_noise")
    assert bool((timesteps < 875).all()) == (role == "low_noise")


@pytest.mark.parametrize("boundary,switch", [(0.417, 875.0), (0.358, 900.0)])
def test_boundaries_are_the_switch_timesteps(boundary, switch):
    """DiffSynth's example scripts say 0.417 is t = 875 (T2V-A14B) and 0.358 is t = 900
    (I2V-A14B): the high-noise range [0, ⌊b·1000⌋) is exactly the table's t >= switch."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(1000, training=True)
    _, high_end = diffsynth_range(0.0, boundary)
    assert int((scheduler.timesteps >= switch).sum()) == high_end


def test_converted_cache_boundaries(tmp_path, data):
    """Boundaries stored in a DiffSynth cache survive conversion and set the range; against
    an expert's own range they are an error unless both flags choose."""
    from flowstep_export.data.convert_diffsynth import main as convert

    cache = tmp_path / "cache"
    cache.mkdir()
    sample = load_file(str(data / "0.safetensors"))
    shared = {"input_latents": sample["latents"][None], "max_timestep_boundary": 0.358, "min_timestep_boundary": 0}
    torch.save((shared, {"context": sample["context"][None]}, {}), cache / "0.pth")
    out = tmp_path / "converted"
    assert convert([str(cache), str(out), "--dtype", "f32"]) == 0
    declared, _ = draws(tmp_path, TINY, out)
    assert declared == diffsynth_range(0.0, 0.358)
    result = flowstep("draws", "--artifacts", A14B / "low_noise" / "artifacts", "--data", out, "--out",
                      tmp_path / "x.safetensors", "--micro-steps", 1, check=False)
    assert result.returncode == 1 and "low_noise expert" in result.stderr and "[0, 0.358)" in result.stderr
    declared, _ = draws(tmp_path, A14B / "low_noise" / "artifacts", out,
                           "--min-timestep-boundary", 0.417, "--max-timestep-boundary", 1)
    assert declared == diffsynth_range(0.417, 1.0)
