#!/usr/bin/env python3
"""flowstep vs the PyTorch reference (DiffSynth's training loop, eager, SDPA) on this
machine, same threads, same artifacts, same data. Prints a table and writes BENCHMARKS.md.

Run through scripts/bench.sh (it builds flowstep and sets up the Python environment). Its
cached exports, random data and the two timed runs (`flowstep_train`, `reference_train`) also
serve scripts/bench_cpu_attention.py.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "export"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CACHE = Path(os.environ.get("FLOWSTEP_CACHE", Path.home() / ".cache" / "flowstep")) / "bench"
FLOWSTEP = ROOT / "target" / "release" / "flowstep"


def exporter_key() -> str:
    """A hash of the exporter's sources: cached exports are reused only while it is unchanged
    (a stale export would benchmark an old graph)."""
    h = hashlib.sha256()  # as scripts/gpu_pack.sh computes it
    for path in sorted((ROOT / "export" / "flowstep_export").rglob("*.py"), key=lambda p: str(p).encode()):
        h.update(path.read_bytes())
    return h.hexdigest()[:10]

# name -> (export preset, latent [F, H, W], steps, rank)
CONFIGS = {
    "tiny": ("tiny", (2, 8, 8), 300, 8),
    "small": ("small", (5, 32, 32), 30, 32),           # 5·16·16 = 1,280 tokens
    "1.3B-shaped": ("wan2.1-t2v-1.3b", (2, 8, 8), 6, 32),  # 32 tokens, full 512-token context
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def peak_rss_gb(cmd, cwd=None, env=None) -> tuple[float, subprocess.CompletedProcess]:
    """Run cmd under GNU time; return (peak RSS GB, the finished process: stdout, stderr)."""
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    kb = int([l for l in out.stderr.splitlines() if l.startswith("MAXRSS")][-1].split()[1])
    return kb / 2**20, out


def ensure_export(preset: str, *flags: str, rank: int = 32) -> Path:
    """The artifacts of `flowstep_export --model PRESET --lora-rank RANK --ship-base FLAGS`,
    exported once per exporter version and cached."""
    tag = "".join("-" + flag.lstrip("-").replace(",", "x") for flag in flags)
    out = CACHE / f"artifacts-{preset}-r{rank}{tag}-{exporter_key()}"
    if not (out / "manifest.json").exists():
        print(f"exporting {out.name} (once) ...", flush=True)
        run([sys.executable, "-m", "flowstep_export", "--model", preset, "--out", str(out), "--lora-rank", str(rank),
             "--ship-base", "-q", *flags], cwd=ROOT / "export")
    return out


def ensure_data(name: str, manifest: dict, latent: tuple[int, int, int], samples: int = 1, seed: int = 0) -> Path:
    """`samples` random latents [C, F, H, W] with full-length random text contexts, cached as `name`."""
    out = CACHE / f"data-{name}"
    if not (out / f"{samples - 1}.safetensors").exists():
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        m = manifest["model"]
        for i in range(samples):
            save_file({"latents": torch.randn(m["in_dim"], *latent, generator=g),
                       "context": torch.randn(m["text_len"], m["text_dim"], generator=g)}, str(out / f"{i}.safetensors"))
    return out


@dataclass
class Run:
    """One timed training run: s/step after its untimed first steps, the process's peak RSS."""
    seconds_per_step: float
    peak_rss_gb: float
    command: list[str]
    stderr: str


def flowstep_train(artifacts: Path, data: Path, steps: int, threads: int, untimed: int,
                   prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> tuple[Run, Path]:
    """One `flowstep train` (run under `prefix`, e.g. avx2_only.sh), and its run directory."""
    out = CACHE / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(FLOWSTEP), "-q", "train", "--artifacts", str(artifacts), "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--threads", str(threads), "--lr", "1e-4"]
    rss, done = peak_rss_gb([*prefix, *cmd], env=env)
    seconds = [r["seconds"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "seconds" in r]
    return Run(statistics.mean(seconds[untimed:]), rss, cmd, done.stderr), out


def reference_train(artifacts: Path, data: Path, steps: int, threads: int, untimed: int, *flags: str,
                    prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Run:
    """One PyTorch reference run (flowstep_export.reference.reference_train FLAGS) under `prefix`."""
    cmd = [sys.executable, "-m", "flowstep_export.reference.reference_train", "--artifacts", str(artifacts), "--data", str(data),
           "--steps", str(steps), "--warmup", str(untimed), "--threads", str(threads), *flags]
    rss, done = peak_rss_gb([*prefix, *cmd], cwd=ROOT / "export", env=env)
    return Run(json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"], rss, cmd, done.stderr)


def step_flops(m: dict, tokens: int) -> float:
    """Matmul FLOPs of one training step (norms, softmax and elementwise work not counted).

    The base weights are frozen, so no weight gradients are computed for them: the video-token
    path costs forward + input-gradient (2x forward), attention costs forward + dQ, dK, dV
    (3x), and the text path (text embedding, cross-attention k/v of the 512 context tokens)
    needs no input gradient (1x; its LoRA gradients are rank-r and small)."""
    d, ffn, L, text = m["dim"], m["ffn_dim"], m["num_layers"], m["text_len"]
    token_linear = L * (2 * tokens * d * d * 4 + 2 * tokens * d * d * 2 + 2 * tokens * d * ffn * 2) \
        + 2 * tokens * m["in_dim"] * 4 * d + 2 * tokens * d * m["out_dim"] * 4
    attention = L * (2 * 2 * tokens * tokens * d + 2 * 2 * tokens * text * d)
    text_linear = 2 * text * m["text_dim"] * d + 2 * text * d * d + L * 2 * text * d * d * 2
    return 2 * token_linear + 3 * attention + text_linear


def matmul_peak_gflops(threads: int) -> float:
    """Best fp32 matmul rate of torch on this machine (sizes 1024-4096, best of 3)."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(3):
            reps = max(1, int(4e9 / (2 * n**3)))
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def bench(name: str, threads: int) -> dict:
    preset, latent, steps, rank = CONFIGS[name]
    artifacts = ensure_export(preset, "--latent", ",".join(map(str, latent)), rank=rank)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    data = ensure_data(name, manifest, latent, samples=4)
    untimed = 2
    ours, out = flowstep_train(artifacts, data, steps, threads, untimed)
    summary = json.loads((out / "summary.json").read_text())
    ref = reference_train(artifacts, data, steps, threads, untimed)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    flops = step_flops(manifest["model"], tokens)
    return {"name": name, "tokens": tokens, "params_M": sum(
        __import__("math").prod(t["shape"]) for t in manifest["base_weights"]["tensors"]) / 1e6,
            "lora_params": manifest["lora"]["num_params"], "steps": steps,
            "flowstep_s": ours.seconds_per_step, "ref_s": ref.seconds_per_step, "speedup": ref.seconds_per_step / ours.seconds_per_step,
            "flowstep_rss": ours.peak_rss_gb, "ref_rss": ref.peak_rss_gb, "rss_ratio": ours.peak_rss_gb / ref.peak_rss_gb,
            "host_fraction": summary["host_fraction"], "gflops": flops / ours.seconds_per_step / 1e9,
            "ref_gflops": flops / ref.seconds_per_step / 1e9, "flowstep_cmd": " ".join(ours.command), "ref_cmd": " ".join(ref.command)}


# Long sequences (issue 10): `small` at 4,096 / 8,192 / 16,384 tokens (4/8/16 frames of 64x64),
# with and without per-block gradient checkpointing on both sides. steps (first one untimed).
LONG_FRAMES = {4: 4, 8: 3, 16: 3}


def long_sequences(threads: int, only_frames: list[int]) -> str:
    rows = []
    for frames, steps in LONG_FRAMES.items():
        if frames not in only_frames:
            continue
        for checkpointing in (False, True):
            flags = ["--gradient-checkpointing"] if checkpointing else []
            artifacts = ensure_export("small", "--attention", "chunked", *flags)
            data = ensure_data(f"small-long-{frames}", json.loads((artifacts / "manifest.json").read_text()), (frames, 64, 64), seed=frames)
            ours, _ = flowstep_train(artifacts, data, steps, threads, 1)
            print(" ".join(ours.command), flush=True)
            ref = reference_train(artifacts, data, steps, threads, 1, *flags)
            print(" ".join(ref.command), flush=True)
            fs, rs = ours.seconds_per_step, ref.seconds_per_step
            rows.append(f"| {frames * 32 * 32:,} | {'on' if checkpointing else 'off'} | {fs:.2f} | {rs:.2f} | {rs / fs:.2f}x | "
                        f"{ours.peak_rss_gb:.2f} GB | {ref.peak_rss_gb:.2f} GB | {ours.peak_rss_gb / ref.peak_rss_gb:.2f} |")
            print(rows[-1], flush=True)
    header = ("| tokens | checkpointing | flowstep s/step | PyTorch s/step | speed-up | flowstep peak RSS | PyTorch peak RSS | RSS ratio |\n"
              "|---|---|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--write", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--long", action="store_true", help="only the long-sequence table (small at 4k/8k/16k tokens); prints it")
    p.add_argument("--long-frames", default=",".join(map(str, LONG_FRAMES)),
                   help="with --long: which rows, as latent frames of 64x64 (4 = 4,096 tokens, 16 = 16,384)")
    args = p.parse_args()
    if args.long:
        print(long_sequences(args.threads, [int(f) for f in args.long_frames.split(",")]))
        return 0
    peak = matmul_peak_gflops(args.threads)
    rows = []
    for name in args.configs.split(","):
        print(f"benchmarking {name} ...", flush=True)
        rows.append(bench(name, args.threads))
    header = ("| config | tokens | base params | flowstep s/step | PyTorch s/step | speed-up | flowstep peak RSS | "
              "PyTorch peak RSS | RSS ratio | host share | flowstep GFLOP/s | PyTorch GFLOP/s |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tokens']} | {r['params_M']:.1f} M | {r['flowstep_s']:.4f} | {r['ref_s']:.4f} | "
                     f"{r['speedup']:.2f}× | {r['flowstep_rss']:.2f} GB | {r['ref_rss']:.2f} GB | {r['rss_ratio']:.2f} | "
                     f"{100 * r['host_fraction']:.2f}% | {r['gflops']:.1f} ({100 * r['gflops'] / peak:.0f}% of peak) | "
                     f"{r['ref_gflops']:.1f} |")
    table = "\n".join(lines)
    print(table)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
               f"best fp32 matmul rate {peak:.1f} GFLOP/s (torch, n = 1024-4096)")
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    text = [f"# Benchmarks (CPU)", "",
            f"Date: {datetime.date.today()}. Machine: {cpu_model}; {machine}.",
            f"flowstep: ONNX Runtime 1.31.1 CPU provider, float32. PyTorch reference: torch {torch.__version__}, "
            "DiffSynth 2.1.12 `WanModel` + `model_fn_wan_video` (SDPA), PEFT LoRA, AdamW, float32, no gradient checkpointing.",
            "Step time excludes the first 2 steps (warm-up); peak RSS is the whole process (GNU time). "
            "GFLOP/s counts the matmul FLOPs of a step (`step_flops` in scripts/bench.py: frozen base weights, so no weight gradients; token path 2× forward, attention 3×, text path 1×) against torch's best fp32 matmul rate here. Host share is the part of flowstep's "
            "step spent outside ONNX Runtime (data, noise/x_t/target, binding).", "", table, "", "Commands:", ""]
    for r in rows:
        text += [f"- {r['name']}: `{r['flowstep_cmd']}`", f"  reference: `{r['ref_cmd']}`"]
    # The sections after the table (targets, GPU runs, long sequences) are kept as written.
    old = args.write.read_text() if args.write.exists() else ""
    notes = old[old.index("\n## "):] if "\n## " in old else ""
    args.write.write_text("\n".join(text) + "\n" + notes)
    print(f"wrote {args.write}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
