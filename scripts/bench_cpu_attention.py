#!/usr/bin/env python3
"""Issue 25's measurement: flowstep with chunked and with fused attention against the PyTorch
reference (DiffSynth's WanModel, SDPA, PEFT) with ATen's own CPU capability and with
ATEN_CPU_CAPABILITY=avx2, interleaved over rounds (every variant once per round, so that a
change in the machine's load hits all of them), same threads, artifacts and data. Prints a
markdown table: s/step (median over rounds, spread), peak RSS, ratios vs PyTorch, CPU model
and flags.

`--avx2-only` makes it an AVX2-only run on an AVX-512 host: every process (flowstep, PyTorch)
runs through scripts/avx2_only.sh, with AVX-512 hidden from CPUID, so ONNX Runtime, the gemm
crate, ATen, MKL and oneDNN all run their AVX2 kernels. Each run must report that it hid
AVX-512, or the benchmark stops.

`--mkl-as-on-intel` runs every process through scripts/intel_vendor.sh (CPUID reports
GenuineIntel): MKL picks its kernels by vendor, and on an AMD host PyTorch's float32 products
otherwise run MKL's generic path at under half the speed they have on an Intel CPU. With it,
the comparison on an AMD host is the one an Intel CPU with the same features would give (as far
as the products go; caches and clocks stay AMD's). Each run must report the replaced vendor.

Run through `scripts/bench.sh attention` (it builds flowstep and sets up Python). Defaults
are the issue's: `small` at 1,280 tokens (5x32x32 latent) and 16,384 tokens (16x64x64), full
512-token context, 2 threads, 3 rounds: about 15 minutes on a 2-core Xeon, plus two exports
(cached) on the first run. Check it quickly with tiny settings:
    scripts/bench.sh attention --model tiny --latents 2x8x8 --steps 4 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench import FLOWSTEP, ROOT, Run, ensure_data, ensure_export, flowstep_train, reference_train  # scripts/bench.py

import torch  # noqa: E402  (after bench, which puts export/ on the path)

# What `ATEN_CPU_CAPABILITY` is set to for each PyTorch variant (None: unset, ATen picks).
ATEN_CAPABILITIES = {"PyTorch": None, "PyTorch avx2": "avx2"}
# CPU flags that decide who wins: AVX-512 (and its bf16 part), AVX2 + FMA, AMX.
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
STEPS_TIMED_FROM = 1  # the first step (graph warm-up, allocations) is never timed


AVX2_ONLY = (str(ROOT / "scripts" / "avx2_only.sh"),)
INTEL_VENDOR = (str(ROOT / "scripts" / "intel_vendor.sh"),)


def environment(capability: str | None) -> dict[str, str]:
    """This process's environment with ATEN_CPU_CAPABILITY=`capability` (unset: None), and
    avx2_only.sh's reports on (they are read only from runs through it or intel_vendor.sh)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env | {"AVX2_ONLY_REPORT": "1"}


def checked(run: Run, prefix: tuple[str, ...]) -> tuple[float, float]:
    """(s/step, peak RSS GB) of `run`, refused when it ran through avx2_only.sh and did not hide
    AVX-512, or through intel_vendor.sh and did not report the vendor."""
    if AVX2_ONLY[0] in prefix:
        hidden = [int(line.split()[-4]) for line in run.stderr.splitlines() if line.startswith("avx2_only:")]
        if not hidden or max(hidden) == 0:
            raise RuntimeError(f"{run.command[0]} ran without AVX-512 hidden (avx2_only reports: {hidden}); the run is not AVX2-only")
    if INTEL_VENDOR[0] in prefix:
        replaced = [int(line.split()[-2]) for line in run.stderr.splitlines() if line.startswith("cpuid vendor:")]
        if not replaced or max(replaced) == 0:
            raise RuntimeError(f"{run.command[0]} ran without the vendor replaced (reports: {replaced}); MKL saw the real vendor")
    return run.seconds_per_step, run.peak_rss_gb


def flowstep_run(prefix: tuple[str, ...], artifacts: Path, data: Path, steps: int, threads: int) -> tuple[float, float]:
    """`flowstep train` on these artifacts and data."""
    return checked(flowstep_train(artifacts, data, steps, threads, STEPS_TIMED_FROM, prefix, environment(None))[0], prefix)


def reference_run(prefix: tuple[str, ...], artifacts: Path, data: Path, steps: int, threads: int, capability: str | None) -> tuple[float, float]:
    """The PyTorch reference with ATEN_CPU_CAPABILITY=`capability`."""
    return checked(reference_train(artifacts, data, steps, threads, STEPS_TIMED_FROM, prefix=prefix, env=environment(capability)), prefix)


def aten_capability(prefix: tuple[str, ...], capability: str | None) -> str:
    """What ATen actually runs with under `capability` (it ignores what the CPU lacks or hides)."""
    out = subprocess.run([*prefix, sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, env=environment(capability), check=True)
    return out.stdout.strip()


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{model}, {os.cpu_count()} cores; flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="export preset (default small)")
    p.add_argument("--latents", default="5x32x32,16x64x64", help="latent sizes FxHxW, comma-separated (tokens: F·H·W/4)")
    p.add_argument("--steps", default="12,3", help="training steps per run for each latent size (the first is not timed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    p.add_argument("--avx2-only", action="store_true",
                   help="hide AVX-512 from every run (an AVX2-only run on an AVX-512 host; see above)")
    p.add_argument("--mkl-as-on-intel", action="store_true",
                   help="report the CPU vendor as GenuineIntel to every run, so that MKL takes the code path it takes on Intel (see above)")
    args = p.parse_args()
    latents = [tuple(int(x) for x in size.split("x")) for size in args.latents.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != len(latents) or min(steps) < 2 or any(len(latent) != 3 for latent in latents):
        p.error(f"--latents {args.latents} and --steps {args.steps}: one step count (at least 2) per FxHxW latent")
    if not FLOWSTEP.exists():
        p.error(f"{FLOWSTEP} is missing: run through scripts/bench.sh attention, which builds it")

    try:
        return measure(args, latents, steps)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
        print(f"error: {detail}", file=sys.stderr)
        return 1


def measure(args, latents: list[tuple[int, int, int]], steps: list[int]) -> int:
    artifacts = {attention: ensure_export(args.model, "--attention", attention) for attention in ("chunked", "fused")}
    manifest = json.loads((artifacts["chunked"] / "manifest.json").read_text())
    data = [ensure_data(f"{args.model}-{'x'.join(map(str, latent))}", manifest, latent) for latent in latents]
    prefix = (AVX2_ONLY if args.avx2_only else ()) + (INTEL_VENDOR if args.mkl_as_on_intel else ())
    # With AVX-512 hidden, ATEN_CPU_CAPABILITY=avx2 changes nothing: one PyTorch variant.
    references = {"PyTorch": None} if args.avx2_only else ATEN_CAPABILITIES
    variants = {
        "flowstep chunked": lambda d, n: flowstep_run(prefix, artifacts["chunked"], d, n, args.threads),
        "flowstep fused": lambda d, n: flowstep_run(prefix, artifacts["fused"], d, n, args.threads),
        **{name: (lambda cap: lambda d, n: reference_run(prefix, artifacts["chunked"], d, n, args.threads, cap))(cap)
           for name, cap in references.items()},
    }
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for latent, d, n in zip(latents, data, steps):
            tokens = latent[0] * latent[1] * latent[2] // 4
            for name, fn in variants.items():
                s, rss = fn(d, n)
                results.setdefault((tokens, name), []).append((s, rss))
                print(f"round {r + 1}/{args.rounds}, {tokens:,} tokens, {name}: {s:.3f} s/step, {rss:.2f} GB", flush=True)

    rows = ["| tokens | variant | s/step (median) | spread (min–max) | peak RSS | " + " | ".join(f"speed vs {r}" for r in references)
            + " | RSS vs PyTorch |", "|---|---|---|---|---|" + "---|" * len(references) + "---|"]
    for latent in latents:
        tokens = latent[0] * latent[1] * latent[2] // 4
        median = {name: statistics.median(s for s, _ in results[(tokens, name)]) for name in variants}
        rss = {name: statistics.median(m for _, m in results[(tokens, name)]) for name in variants}
        for name in variants:
            times = [s for s, _ in results[(tokens, name)]]
            rows.append(f"| {tokens:,} | {name} | {median[name]:.3f} | {min(times):.3f}–{max(times):.3f} | {rss[name]:.2f} GB | "
                        + "".join(f"{median[r] / median[name]:.2f}× | " for r in references)
                        + f"{rss[name] / rss['PyTorch']:.2f} |")
    capabilities = ", ".join(f"{aten_capability(prefix, cap)} (ATEN_CPU_CAPABILITY={cap or 'unset'})" for cap in references.values())
    header = [f"CPU: {cpu_description()}." + (" AVX-512 hidden from every run (scripts/avx2_only.sh)." if args.avx2_only else "")
              + (" Vendor reported as GenuineIntel to every run (scripts/intel_vendor.sh): MKL on its Intel path." if args.mkl_as_on_intel else ""),
              f"ATen capability: {capabilities}; "
              f"torch {torch.__version__}. {args.threads} threads, {args.rounds} interleaved rounds, model `{args.model}`, "
              f"{manifest['model']['text_len']}-token context; steps per run {args.steps} (first not timed); "
              f"{datetime.date.today()}.", ""]
    print("\n".join(header + rows))
    if args.json:
        args.json.write_text(json.dumps([{"tokens": t, "variant": v, "runs": [{"s_per_step": s, "peak_rss_gb": m} for s, m in runs]}
                                         for (t, v), runs in results.items()], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
