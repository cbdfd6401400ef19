"""`flowstep train --timestep-sampling` against musubi-tuner's own sampling code.

musubi-tuner is not installed here (nor reachable in CI), so the few lines of its sampling
math are quoted below, unchanged but for the `args.` prefix, from kohya-ss/musubi-tuner at
commit 30c658c4: src/musubi_tuner/training/trainer_base.py
(`get_noisy_model_input_and_timesteps`), src/musubi_tuner/training/timesteps.py
(`compute_density_for_timestep_sampling`) and
src/musubi_tuner/modules/scheduling_flow_match_discrete.py (the training table). They share no
code with flowstep.

Two checks per mode, on 100,000 draws of `flowstep draws` (the draws of `flowstep train` with
the same seed and options):
- exact: musubi's `org_timesteps` path maps given uniforms through erfinv, so flowstep's own
  uniform variates (`timestep_uniform`) fed to musubi's functions (in float64) must give
  flowstep's σ and model timestep to float32 rounding, and the same table index;
- distribution: musubi's functions with torch's own RNG against flowstep's draws, two-sample
  Kolmogorov-Smirnov at α = 1e-3. For n = m = 100,000 the critical D is
  sqrt(-ln(α/2)/2 · (n+m)/(n·m)) = 0.0087; ties (index modes) only make the test conservative.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowstep_export.reference.scheduler_ref import training_schedule
from independent import ROOT, flowstep
from torch_spread import SIGMA_ULPS, TIMESTEP_ULPS, weight_tolerance

N = 100_000
KS_CRITICAL = math.sqrt(-math.log(1e-3 / 2) / 2 * (2 * N) / (N * N))


def assert_table_values(got: torch.Tensor, want: torch.Tensor, ulps: int, what: str):
    """flowstep's table is fixed; the one torch computes here moves by a few ulps with
    PyTorch's CPU kernels (linspace's fma: torch_spread.py), so entries agree within `ulps`."""
    want = want.double()
    tol = ulps * torch.from_numpy(np.spacing(want.abs().float().numpy())).double()
    bad = ((got.double() - want).abs() > tol).nonzero()
    assert bad.numel() == 0, f"{what}[{bad[0].item()}]: flowstep {got[bad[0]].item()!r}, torch here {want[bad[0]].item()!r}"


def assert_table_weights(got: torch.Tensor, weights: torch.Tensor, index: torch.Tensor):
    tol = torch.from_numpy(weight_tolerance(1000, weights.double().numpy()))[index]
    assert bool(((got.double() - weights[index].double()).abs() <= tol).all()), "--loss-weighting diffsynth: the table's weights"


ARTIFACTS = ROOT / "models" / "toy" / "artifacts"
DATA = ROOT / "models" / "toy" / "data" / "train"


# ---- quoted from musubi-tuner 30c658c4 (see the module docstring) ------------------------
def uniform_to_normal_ppF(t_uniform: torch.Tensor) -> torch.Tensor:
    """Use `torch.erfinv` to compute the inverse CDF to generate values from a normal distribution."""
    # Clip small values to prevent inf in erfinv
    eps = 1e-7
    t_uniform = torch.clamp(t_uniform, eps, 1.0 - eps)

    # PPF of standard normal distribution: sqrt(2) * erfinv(2q - 1)
    term = 2.0 * t_uniform - 1.0
    x_normal = math.sqrt(2.0) * torch.erfinv(term)
    return x_normal


def compute_sampling_timesteps(args, batch_size, org_timesteps):
    def rand(bs, org_ts=None):
        return torch.rand((bs,)) if org_ts is None else org_ts

    def randn(bs, org_ts=None):
        return uniform_to_normal_ppF(org_ts) if org_ts is not None else torch.randn((bs,))

    if args.timestep_sampling == "uniform" or args.timestep_sampling == "sigmoid":
        # Simple random t-based noise sampling
        if args.timestep_sampling == "sigmoid":
            t = torch.sigmoid(args.sigmoid_scale * randn(batch_size, org_timesteps))
        else:
            t = rand(batch_size, org_timesteps)
    elif args.timestep_sampling.endswith("shift"):
        shift = args.discrete_flow_shift
        logits_norm = randn(batch_size, org_timesteps)
        logits_norm = logits_norm * args.sigmoid_scale  # larger scale for more uniform sampling
        t = logits_norm.sigmoid()
        t = (t * shift) / (1 + (shift - 1) * t)
    return t  # 0 to 1


def continuous_timesteps(args, t_min, t_max, org_timesteps, batch_size=N):
    """The continuous branch: returns (σ = t, the model's timestep)."""
    t = compute_sampling_timesteps(args, batch_size, org_timesteps)
    t = t * (t_max - t_min) + t_min  # scale to [t_min, t_max], default [0, 1]
    timesteps = t * 1000.0
    timesteps += 1  # 1 to 1000
    return t, timesteps


def compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean=None, logit_std=None, normal=torch.normal):
    if weighting_scheme == "logit_normal":
        # See 3.1 in the SD3 paper ($rf/lognorm(0.00,1.00)$).
        u = normal(mean=logit_mean, std=logit_std, size=(batch_size,), device="cpu")
        u = torch.nn.functional.sigmoid(u)
    return u


def training_table(num_train_timesteps=1000):
    """FlowMatchDiscreteScheduler(shift=..., reverse=True).__init__: the training table is unshifted."""
    sigmas = torch.linspace(1, 0, num_train_timesteps + 1)
    timesteps = (sigmas[:-1] * num_train_timesteps).to(dtype=torch.float32)
    return sigmas, timesteps
# ---- end of the quoted code --------------------------------------------------------------


def draws(tmp_path, *options, seed=11):
    out = tmp_path / "draws.safetensors"
    flowstep("draws", "--artifacts", ARTIFACTS, "--data", DATA, "--out", out, "--micro-steps", N, "--timesteps-only",
             "--seed", seed, *options)
    return load_file(str(out))


def ks_statistic(a, b) -> float:
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    points = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, points, "right") / len(a) - np.searchsorted(b, points, "right") / len(b))))


CONTINUOUS = {
    "sigmoid": (["--sigmoid-scale", "1.5"], SimpleNamespace(timestep_sampling="sigmoid", sigmoid_scale=1.5)),
    "shift": (["--discrete-flow-shift", "3"], SimpleNamespace(timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=3.0)),
    "shift, scaled": (["--sigmoid-scale", "0.7", "--discrete-flow-shift", "5"],
                      SimpleNamespace(timestep_sampling="shift", sigmoid_scale=0.7, discrete_flow_shift=5.0)),
}


@pytest.mark.parametrize("case", CONTINUOUS)
@pytest.mark.parametrize("boundaries", [None, (0.0, 0.417)])
def test_continuous_modes_are_musubis(tmp_path, case, boundaries):
    flags, args = CONTINUOUS[case]
    mode = args.timestep_sampling
    extra = [] if boundaries is None else ["--min-timestep-boundary", boundaries[0], "--max-timestep-boundary", boundaries[1]]
    d = draws(tmp_path, "--timestep-sampling", mode, *flags, *extra)
    # flowstep's mapping of its boundaries (fractions of DiffSynth's shift-5 table) onto
    # musubi's t range: [σ(⌊max·1000⌋), σ(⌊min·1000⌋)]; the defaults give musubi's [0, 1].
    t_min, t_max = 0.0, 1.0
    if boundaries is not None:
        sigmas = training_schedule(1000, 5.0)[0].double()
        t_min, t_max = float(sigmas[int(boundaries[1] * 1000)]), float(sigmas[int(boundaries[0] * 1000)])
        assert 0.874 < t_min < 0.875, t_min  # the T2V-A14B high-noise expert: t ≥ 875
    u = d["timestep_uniform"].double()
    sigma, timestep = continuous_timesteps(args, t_min, t_max, u)
    assert (d["sigma"].double() - sigma).abs().max() < 2e-7
    assert (d["timestep"].double() - timestep).abs().max() < 1.5e-4  # float32 ulp at 1000: 6.1e-5
    assert torch.all(d["weight"] == 1.0), "musubi's weighting_scheme none by default"
    torch.manual_seed(0)
    reference, _ = continuous_timesteps(args, t_min, t_max, None)
    assert ks_statistic(d["sigma"], reference) < KS_CRITICAL


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 1.2)])
def test_logit_normal_indexes_musubis_table(tmp_path, mean, std):
    d = draws(tmp_path, "--timestep-sampling", "logit_normal", "--logit-mean", mean, "--logit-std", std, "--shift", "1")
    z = uniform_to_normal_ppF(d["timestep_uniform"].double())
    u = compute_density_for_timestep_sampling("logit_normal", N, mean, std, normal=lambda mean, std, size, device: mean + std * z)
    t_min, t_max = 0, 1000
    indices = (u * (t_max - t_min) + t_min).long()
    assert torch.equal(d["timestep_index"].long(), indices)
    # With --shift 1 flowstep's table is musubi's training table: same timestep and σ.
    sigmas, timesteps = training_table()
    assert_table_values(d["timestep"], timesteps[indices], TIMESTEP_ULPS, "timestep")
    assert_table_values(d["sigma"], sigmas[indices], SIGMA_ULPS, "sigma")
    assert torch.all(d["weight"] == 1.0)
    torch.manual_seed(0)
    reference = (compute_density_for_timestep_sampling("logit_normal", N, mean, std) * 1000).long()
    assert ks_statistic(d["timestep_index"], reference) < KS_CRITICAL


def test_logit_normal_within_boundaries_uses_flowsteps_table(tmp_path):
    d = draws(tmp_path, "--timestep-sampling", "logit_normal", "--min-timestep-boundary", "0.417", "--loss-weighting", "diffsynth")
    z = uniform_to_normal_ppF(d["timestep_uniform"].double())
    u = compute_density_for_timestep_sampling("logit_normal", N, 0.0, 1.0, normal=lambda mean, std, size, device: mean + std * z)
    indices = (u * (1000 - 417) + 417).long()
    assert torch.equal(d["timestep_index"].long(), indices)
    sigmas, timesteps, weights = training_schedule(1000, 5.0)
    assert_table_values(d["sigma"], sigmas[indices], SIGMA_ULPS, "sigma")
    assert_table_values(d["timestep"], timesteps[indices], TIMESTEP_ULPS, "timestep")
    assert_table_weights(d["weight"], weights, indices)


def test_uniform_is_diffsynths_index_draw(tmp_path):
    d = draws(tmp_path)
    assert "timestep_uniform" not in d
    sigmas, timesteps, weights = training_schedule(1000, 5.0)
    index = d["timestep_index"].long()
    assert_table_values(d["timestep"], timesteps[index], TIMESTEP_ULPS, "timestep")
    assert_table_weights(d["weight"], weights, index)
    torch.manual_seed(0)
    assert ks_statistic(index, torch.randint(0, 1000, (N,))) < KS_CRITICAL  # DiffSynth's FlowMatchSFTLoss draw
