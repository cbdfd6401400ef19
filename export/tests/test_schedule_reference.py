"""The torch scheduler flowstep's reference loop uses equals DiffSynth's, and the committed
golden tables the Rust tests read are what DiffSynth computes today, on this machine.

DiffSynth's table is a property of the machine: PyTorch picks its CPU kernels by instruction set
(`ATEN_CPU_CAPABILITY`), and the kernels for linspace's multiply-add, exp and sum round
differently. Measured on one Xeon (torch 2.15.0), N = 1000, shift 5, against the golden written
on an AMD EPYC: AVX-512 and AVX2 change 25 weights by at most 4.8e-7; `default` changes 34
sigmas by 1-2 ulps and 959 weights by up to 1.0e-6. The tolerances below are derived from the
computation, not from those measurements, so they hold on any x86-64 CPU.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from flowstep_export.reference.schedule_goldens import CASES, case_name, diffsynth_table
from flowstep_export.reference.scheduler_ref import training_schedule
from torch_spread import SIGMA_ULPS, TIMESTEP_ULPS, weight_tolerance

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"

@pytest.mark.parametrize("steps,shift,strength", CASES)
def test_reference_schedule_equals_diffsynth(steps, shift, strength):
    # Same torch, same process, same kernels on both sides: exact on any machine.
    ours = training_schedule(steps, shift, strength)
    theirs = diffsynth_table(steps, shift, strength)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps,shift,strength", CASES)
def test_committed_goldens_are_current(steps, shift, strength):
    sigmas, timesteps, weights = (x.numpy().astype(np.float64) for x in diffsynth_table(steps, shift, strength))
    rows = list(csv.DictReader(open(GOLDEN / case_name(steps, shift, strength))))
    assert len(rows) == steps
    golden = {k: np.array([float(r[k]) for r in rows]) for k in ("sigma", "timestep", "weight")}
    ulp = np.spacing(np.abs(sigmas).astype(np.float32)).astype(np.float64)
    assert_within("sigma", golden["sigma"], sigmas, SIGMA_ULPS * ulp)
    ulp = np.spacing(np.abs(timesteps).astype(np.float32)).astype(np.float64)
    assert_within("timestep", golden["timestep"], timesteps, TIMESTEP_ULPS * ulp)
    assert_within("weight", golden["weight"], weights, weight_tolerance(steps, weights))


def assert_within(name, committed, here, tol):
    bad = np.nonzero(np.abs(committed - here) > tol)[0]
    assert bad.size == 0, f"{name}[{bad[0]}]: committed {committed[bad[0]]!r}, DiffSynth here {here[bad[0]]!r}, tolerance {tol[bad[0]]:.2e} ({bad.size} entries off)"


def test_weight_tolerance_catches_a_real_change():
    """The tolerance is ~1e-5 of a weight: far below what a wrong formula does (a different
    centre, a missing correction term or a float16 exp all move weights by 1e-4 or more)."""
    sigmas, timesteps, weights = (x.numpy().astype(np.float64) for x in diffsynth_table(1000, 5.0, 1.0))
    tol = weight_tolerance(1000, weights)
    assert tol.max() < 2e-5
    y = np.exp(-2 * ((timesteps - 501) / 1000) ** 2)  # centre off by one timestep
    shifted = (y - y.min()) * 1000 / (y - y.min()).sum()
    assert (np.abs(shifted - weights) > tol).any()
