#!/usr/bin/env python3
"""flowstep vs the PyTorch reference (DiffSynth's training loop, eager, SDPA) on this
machine, same threads, same artifacts, same data. Prints a table and writes BENCHMARKS.md.

Run through scripts/bench.sh (it builds flowstep and sets up the Python environment).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
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


def ensure_artifacts(name: str) -> Path:
    preset, latent, _, rank = CONFIGS[name]
    out = CACHE / f"artifacts-{preset}-r{rank}-{exporter_key()}"
    if not (out / "manifest.json").exists():
        print(f"exporting {preset} (once, cached in {out}) ...", flush=True)
        run([sys.executable, "-m", "flowstep_export", "--model", preset, "--out", str(out), "--lora-rank", str(rank),
             "--ship-base", "--latent", ",".join(map(str, latent)), "-q"], cwd=ROOT / "export")
    return out


def ensure_data(name: str, manifest: dict) -> Path:
    _, (f, h, w), _, _ = CONFIGS[name]
    out = CACHE / f"data-{name}"
    if not out.exists():
        out.mkdir(parents=True)
        g = torch.Generator().manual_seed(0)
        m = manifest["model"]
        for i in range(4):
            save_file({"latents": torch.randn(m["in_dim"], f, h, w, generator=g),
                       "context": torch.randn(m["text_len"], m["text_dim"], generator=g)}, str(out / f"{i}.safetensors"))
    return out


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
    preset, (f, h, w), steps, rank = CONFIGS[name]
    artifacts = ensure_artifacts(name)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    data = ensure_data(name, manifest)
    out = CACHE / f"run-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    warm = 2
    cmd = [str(FLOWSTEP), "-q", "train", "--artifacts", str(artifacts), "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--threads", str(threads), "--lr", "1e-4"]
    rss_fs, _ = peak_rss_gb(cmd)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    fs_sec = sum(r["seconds"] for r in records[warm:]) / len(records[warm:])
    summary = json.loads((out / "summary.json").read_text())
    ref_cmd = [sys.executable, "-m", "flowstep_export.reference.reference_train", "--artifacts", str(artifacts), "--data", str(data),
               "--steps", str(steps), "--warmup", str(warm), "--threads", str(threads)]
    rss_ref, done = peak_rss_gb(ref_cmd, cwd=ROOT / "export")
    ref = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = f * (h // 2) * (w // 2)
    flops = step_flops(manifest["model"], tokens)
    return {"name": name, "tokens": tokens, "params_M": sum(
        __import__("math").prod(t["shape"]) for t in manifest["base_weights"]["tensors"]) / 1e6,
            "lora_params": manifest["lora"]["num_params"], "steps": steps,
            "flowstep_s": fs_sec, "ref_s": ref["seconds_per_step"], "speedup": ref["seconds_per_step"] / fs_sec,
            "flowstep_rss": rss_fs, "ref_rss": rss_ref, "rss_ratio": rss_fs / rss_ref,
            "host_fraction": summary["host_fraction"], "gflops": flops / fs_sec / 1e9, "ref_gflops": flops / ref["seconds_per_step"] / 1e9,
            "flowstep_cmd": " ".join(cmd), "ref_cmd": " ".join(ref_cmd)}


# Long sequences (issue 10): `small` at 4,096 / 8,192 / 16,384 tokens (4/8/16 frames of 64x64),
# with and without per-block gradient checkpointing on both sides. steps (first one untimed).
LONG_FRAMES = {4: 4, 8: 3, 16: 3}


def ensure_long_artifacts(checkpointing: bool) -> Path:
    out = CACHE / f"artifacts-small-r32-chunked{'-ckpt' if checkpointing else ''}-{exporter_key()}"
    if not (out / "manifest.json").exists():
        print(f"exporting {out.name} (once) ...", flush=True)
        flags = ["--gradient-checkpointing"] if checkpointing else []
        run([sys.executable, "-m", "flowstep_export", "--model", "small", "--out", str(out), "--lora-rank", "32",
             "--ship-base", "-q", *flags], cwd=ROOT / "export")
    return out


def long_sequences(threads: int, only_frames: list[int]) -> str:
    rows = []
    for frames, steps in LONG_FRAMES.items():
        if frames not in only_frames:
            continue
        data = CACHE / f"data-small-long-{frames}"
        if not data.exists():
            data.mkdir(parents=True)
            g = torch.Generator().manual_seed(frames)
            save_file({"latents": torch.randn(16, frames, 64, 64, generator=g), "context": torch.randn(512, 4096, generator=g)},
                      str(data / "0.safetensors"))
        for checkpointing in (False, True):
            artifacts = ensure_long_artifacts(checkpointing)
            out = CACHE / "run-long"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [str(FLOWSTEP), "-q", "train", "--artifacts", str(artifacts), "--data", str(data), "--out", str(out),
                   "--steps", str(steps), "--threads", str(threads)]
            print(" ".join(cmd), flush=True)
            rss_fs, _ = peak_rss_gb(cmd)
            records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"seconds"' in l][1:]
            fs = sum(r["seconds"] for r in records) / len(records)
            ref_cmd = [sys.executable, "-m", "flowstep_export.reference.reference_train", "--artifacts", str(artifacts), "--data", str(data),
                       "--steps", str(steps), "--warmup", "1", "--threads", str(threads)] + (["--gradient-checkpointing"] if checkpointing else [])
            print(" ".join(ref_cmd), flush=True)
            rss_ref, done = peak_rss_gb(ref_cmd, cwd=ROOT / "export")
            ref = json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]
            rows.append(f"| {frames * 32 * 32:,} | {'on' if checkpointing else 'off'} | {fs:.2f} | {ref:.2f} | {ref / fs:.2f}x | "
                        f"{rss_fs:.2f} GB | {rss_ref:.2f} GB | {rss_fs / rss_ref:.2f} |")
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
