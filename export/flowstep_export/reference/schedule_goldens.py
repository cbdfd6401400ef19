"""Writes tests/golden/schedule_*.csv from DiffSynth-Studio's own FlowMatchScheduler
(template "Wan", float32 torch.linspace): the reference tables for the Rust scheduler.

python -m flowstep_export.reference.schedule_goldens --out ../tests/golden
"""

from __future__ import annotations

import argparse
from pathlib import Path

# (num_steps, shift, denoising_strength)
CASES = [(1000, 5.0, 1.0), (50, 5.0, 1.0), (1000, 3.0, 1.0), (30, 5.0, 0.7)]


def case_name(steps: int, shift: float, strength: float) -> str:
    return f"schedule_n{steps}_shift{shift:g}_d{strength:g}.csv"


def diffsynth_table(steps: int, shift: float, strength: float):
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    s = FlowMatchScheduler("Wan")
    s.set_timesteps(steps, denoising_strength=strength, training=True, shift=shift)
    return s.sigmas, s.timesteps, s.linear_timesteps_weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for steps, shift, strength in CASES:
        sigmas, timesteps, weights = diffsynth_table(steps, shift, strength)
        lines = ["index,sigma,timestep,weight"]
        # repr of a float32 widened to float64 round-trips exactly.
        lines += [f"{i},{float(sigmas[i])!r},{float(timesteps[i])!r},{float(weights[i])!r}" for i in range(steps)]
        (args.out / case_name(steps, shift, strength)).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
