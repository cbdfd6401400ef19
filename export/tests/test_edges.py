"""Tests at the edges (issue 26), Python side: the data tools' bucket options at their
nearest invalid values, flowstep's learning-rate schedules at the warm-up boundary against
torch's own schedulers (the references the independent loop and DiffSynth use), and the
timing warm-up boundary of the PyTorch reference trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowstep_export.data.media import MAX_FRAMES, MAX_SIDE, Bucket, parse_frames, parse_resolutions
from independent import TINY, flowstep


@pytest.mark.parametrize("value", ["1", "5", "9", "81", "5,9", str(MAX_FRAMES)])
def test_frames_of_the_form_4k_plus_1_are_accepted(value):
    assert parse_frames([value]) == sorted(int(v) for v in value.split(","))


# Wan's VAE packs 4 frames after the first: every count next to a valid one (and odd counts
# that are not 4k+1, which an "odd" check would accept) is refused.
@pytest.mark.parametrize("value", ["0", "2", "3", "4", "6", "7", "8", "10", "79", "80", "82", "-3", "5,7", str(MAX_FRAMES + 4)])
def test_frames_next_to_4k_plus_1_are_refused(value):
    with pytest.raises(ValueError, match=r"^--frames -?\d+: must be 4k\+1 \(1, 5, 9, \.\.\., 81\), at most \d+$"):
        parse_frames([value])


def test_resolutions_at_the_multiple_are_accepted():
    assert parse_resolutions(["16x16", "32x48"], 16) == [Bucket(16, 16), Bucket(32, 48)]
    assert parse_resolutions([f"{MAX_SIDE}x16"], 16) == [Bucket(MAX_SIDE, 16)]


@pytest.mark.parametrize("value", ["0x16", "16x0", "8x16", "16x8", "24x16", "16x31", "16x33", "-16x16", "16x-16",
                                   f"{MAX_SIDE + 16}x16", f"16x{MAX_SIDE + 16}"])
def test_resolutions_next_to_the_multiple_are_refused(value):
    with pytest.raises(ValueError, match=r"height and width must be multiples of 16 .* from 16 to \d+$"):
        parse_resolutions([value], 16)


LR, STEPS = 3e-3, 8
S = torch.optim.lr_scheduler


def lrs_of(tmp_path, schedule: str, steps: int) -> list[float]:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        g = torch.Generator().manual_seed(0)
        save_file({"latents": torch.randn(16, 2, 8, 8, generator=g), "context": torch.randn(16, 64, generator=g)},
                  str(data / "0.safetensors"))
    out = tmp_path / schedule.replace(":", "-")
    flowstep("-q", "train", "--artifacts", TINY, "--data", data, "--out", out, "--steps", steps, "--lr", LR,
             "--lr-schedule", schedule)
    return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def torch_lrs(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# flowstep's schedule -> torch's: LinearLR from lr/N reaching lr at the warm-up's last step
# (as the independent loop in test_reference_loop.py builds it), the cosine after it, and
# DiffSynth-Studio's ConstantLR with torch's defaults (lr/3 while fewer than 5 steps are done).
SCHEDULES = {
    "warmup:2": lambda o: S.LinearLR(o, start_factor=1 / 2, end_factor=1.0, total_iters=1),
    "warmup:4": lambda o: S.LinearLR(o, start_factor=1 / 4, end_factor=1.0, total_iters=3),
    "cosine:2:0.5": lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=1 / 2, end_factor=1.0, total_iters=1),
                                                 S.CosineAnnealingLR(o, T_max=STEPS - 2, eta_min=LR * 0.5)], milestones=[2]),
    "diffsynth": lambda o: S.ConstantLR(o),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_lr_schedules_match_torch_at_the_warmup_boundary(tmp_path, schedule):
    got = lrs_of(tmp_path, schedule, STEPS)
    want = torch_lrs(SCHEDULES[schedule], STEPS)
    assert got == pytest.approx(want, rel=1e-12, abs=0), (got, want)
    # The first step after the warm-up (and torch's ConstantLR's 5 steps) is the base rate itself.
    first_full = {"warmup:2": 2, "warmup:4": 4, "cosine:2:0.5": 2, "diffsynth": 5}[schedule]
    assert got[first_full] == LR and got[first_full - 1] <= LR, got
    assert all(lr < LR for lr in got[:first_full - 1]), got


@pytest.mark.parametrize("warmup, timed", [(0, 3), (2, 1), (3, 0)])
def test_reference_trainer_times_the_steps_after_its_warmup(tmp_path, warmup, timed):
    """reference_train.py's --warmup excludes exactly that many steps from the timing. Run as its
    own process: it switches flowstep_export.model.model's attention and norms to PyTorch's stock ops."""
    data = tmp_path / "data"
    data.mkdir()
    save_file({"latents": torch.randn(16, 2, 8, 8), "context": torch.randn(16, 64)}, str(data / "0.safetensors"))
    r = subprocess.run([sys.executable, "-m", "flowstep_export.reference.reference_train", "--artifacts", str(TINY), "--data", str(data),
                        "--steps", "3", "--warmup", str(warmup), "--impl", "torch"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["steps"], report["timed_steps"]) == (3, timed)
    assert (report["seconds_per_step"] > 0) == (timed > 0)


@pytest.mark.parametrize("scale", [0.0, 1e-4, 1e-3, 3e-3])
def test_norms_where_eps_matters(scale):
    """Rows whose mean square is near or below eps = 1e-6 (scale 1e-3 is eps itself; 0 is a
    zero row): the eps term decides the norms' values and gradients there, which the order-1
    inputs of test_pointwise.py cannot see. References: F.layer_norm and Wan's RMSNorm formula
    under float64 autograd."""
    from flowstep_export.model import pointwise

    g = torch.Generator().manual_seed(0)
    x, dy, w = torch.randn(2, 5, 48, generator=g) * scale, torch.randn(2, 5, 48, generator=g), torch.randn(48, generator=g)

    def run(fn, *tensors):
        tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = fn(*tensors)
        out.backward(dy.to(out.dtype))
        return [out.detach().double()] + [t.grad.double() for t in tensors]

    cases = [(lambda x, w: pointwise.rms_norm(x, w, 1e-6), lambda x, w: x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w),
             (lambda x, w: pointwise.layer_norm(x, w, None, 1e-6), lambda x, w: F.layer_norm(x, (48,), w, None, eps=1e-6))]
    for ours, ref in cases:
        got, want = run(ours, x, w), run(ref, x.double(), w.double())
        for a, r in zip(got, want, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("raw_fps, fps, frames, available", [
    (8.0, 4.0, 5, 11),    # whole indices
    (8.0, 3.0, 9, 24),    # fractions above and below one half
    (10.0, 4.0, 9, 21),   # exact halves: Python's round() goes to even, as DiffSynth's does
    (30.0, 16.0, 17, 20), # past the last source frame: clamped to it
    (23.976, 16.0, 81, 200),
])
def test_frame_resampling_matches_diffsynth(raw_fps, fps, frames, available):
    """media.frame_ids against DiffSynth's own FrameSamplerByRateMixin.map_single_frame_id
    (LoadVideo with fix_frame_rate): round to the nearest source frame, clamp to the last."""
    from diffsynth.core.data.operators import FrameSamplerByRateMixin

    from flowstep_export.data.media import frame_ids

    sampler = FrameSamplerByRateMixin(num_frames=frames, frame_rate=fps, fix_frame_rate=True)
    want = [sampler.map_single_frame_id(i, raw_fps, available) for i in range(frames)]
    assert frame_ids(available, raw_fps, frames, fps) == want
    assert frame_ids(available, raw_fps, frames, None) == list(range(frames))


def test_source_size_limits_hold_at_their_values():
    """media.bucket_for: a source of exactly MAX_SOURCE_PIXELS pixels is read, one row more is
    refused; covering the bucket may crop away exactly MAX_COVER times its area, not more."""
    from flowstep_export.data.media import MAX_COVER, MAX_SOURCE_PIXELS, bucket_for

    bucket = Bucket(16, 16)
    side = 1 << 13
    assert side * side == MAX_SOURCE_PIXELS and bucket_for(side, side, [bucket]) == bucket
    with pytest.raises(ValueError, match=r"^is 8192x8193, more than 64 M pixels$"):
        bucket_for(side, side + 1, [bucket])
    # A 16-high strip covers a 16x16 bucket unscaled: width / 16 times the bucket's area.
    assert bucket_for(16 * MAX_COVER, 16, [bucket]) == bucket
    with pytest.raises(ValueError, match=r"crop away all but 1/8$"):
        bucket_for(16 * MAX_COVER + 1, 16, [bucket])
