"""The torch scheduler flowstep's reference loop uses equals DiffSynth's, and the committed
golden tables the Rust tests read are what DiffSynth computes today."""

import csv
from pathlib import Path

import pytest
import torch

from flowstep_export.schedule_goldens import CASES, case_name, diffsynth_table
from flowstep_export.scheduler_ref import training_schedule

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"


@pytest.mark.parametrize("steps,shift,strength", CASES)
def test_reference_schedule_equals_diffsynth(steps, shift, strength):
    ours = training_schedule(steps, shift, strength)
    theirs = diffsynth_table(steps, shift, strength)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps,shift,strength", CASES)
def test_committed_goldens_are_current(steps, shift, strength):
    sigmas, timesteps, weights = diffsynth_table(steps, shift, strength)
    rows = list(csv.DictReader(open(GOLDEN / case_name(steps, shift, strength))))
    assert len(rows) == steps
    for i, row in enumerate(rows):
        assert float(row["sigma"]) == float(sigmas[i])
        assert float(row["timestep"]) == float(timesteps[i])
        assert float(row["weight"]) == float(weights[i])
