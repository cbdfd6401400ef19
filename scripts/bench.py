#!/usr/bin/env python3
"""flowstep vs the PyTorch reference (DiffSynth's training loop, eager, SDPA) on this
machine, same threads, same artifacts, same data. Prints a table and writes BENCHMARKS.md.

Run through scripts/bench.sh (it builds flowstep and sets up the Python environment).
"""

from __future__ import annotations

import argparse
import datetime
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

# name -> (export preset, latent [F, H, W], steps, rank)
CONFIGS = {
    "tiny": ("tiny", (2, 8, 8), 300, 8),
    "small": ("small", (5, 32, 32), 30, 32),           # 5·16·16 = 1,280 tokens
    "1.3B-shaped": ("wan2.1-t2v-1.3b", (2, 8, 8), 6, 32),  # 32 tokens, full 512-token context
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def peak_rss_gb(cmd) -> tuple[float, str]:
    """Run cmd under GNU time; return (peak RSS GB, stdout)."""
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    kb = int([l for l in out.stderr.splitlines() if l.startswith("MAXRSS")][-1].split()[1])
    return kb / 2**20, out.stdout


def ensure_artifacts(name: str) -> Path:
    preset, latent, _, rank = CONFIGS[name]
    out = CACHE / f"artifacts-{preset}-r{rank}"
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
    ref_cmd = [sys.executable, "-m", "flowstep_export.reference_train", "--artifacts", str(artifacts), "--data", str(data),
               "--steps", str(steps), "--warmup", str(warm), "--threads", str(threads)]
    env_cwd = ROOT / "export"
    rss_ref, stdout = peak_rss_gb_cwd(ref_cmd, env_cwd)
    ref = json.loads(stdout.strip().splitlines()[-1])
    tokens = f * (h // 2) * (w // 2)
    flops = step_flops(manifest["model"], tokens)
    return {"name": name, "tokens": tokens, "params_M": sum(
        __import__("math").prod(t["shape"]) for t in manifest["base_weights"]["tensors"]) / 1e6,
            "lora_params": manifest["lora"]["num_params"], "steps": steps,
            "flowstep_s": fs_sec, "ref_s": ref["seconds_per_step"], "speedup": ref["seconds_per_step"] / fs_sec,
            "flowstep_rss": rss_fs, "ref_rss": rss_ref, "rss_ratio": rss_fs / rss_ref,
            "host_fraction": summary["host_fraction"], "gflops": flops / fs_sec / 1e9, "ref_gflops": flops / ref["seconds_per_step"] / 1e9,
            "flowstep_cmd": " ".join(cmd), "ref_cmd": " ".join(ref_cmd)}


def peak_rss_gb_cwd(cmd, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return peak_rss_gb(cmd)
    finally:
        os.chdir(old)


# Long sequences (issue 10): `small` at 4,096 / 8,192 / 16,384 tokens (4/8/16 frames of 64x64),
# with and without per-block gradient checkpointing on both sides. steps (first one untimed).
LONG_FRAMES = {4: 4, 8: 3, 16: 3}


def ensure_long_artifacts(checkpointing: bool) -> Path:
    out = CACHE / f"artifacts-small-r32-chunked{'-ckpt' if checkpointing else ''}"
    if not (out / "manifest.json").exists():
        print(f"exporting {out.name} (once) ...", flush=True)
        flags = ["--gradient-checkpointing"] if checkpointing else []
        run([sys.executable, "-m", "flowstep_export", "--model", "small", "--out", str(out), "--lora-rank", "32",
             "--ship-base", "-q", *flags], cwd=ROOT / "export")
    return out


def long_sequences(threads: int) -> str:
    rows = []
    for frames, steps in LONG_FRAMES.items():
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
            ref_cmd = [sys.executable, "-m", "flowstep_export.reference_train", "--artifacts", str(artifacts), "--data", str(data),
                       "--steps", str(steps), "--warmup", "1", "--threads", str(threads)] + (["--gradient-checkpointing"] if checkpointing else [])
            print(" ".join(ref_cmd), flush=True)
            rss_ref, stdout = peak_rss_gb_cwd(ref_cmd, ROOT / "export")
            ref = json.loads(stdout.strip().splitlines()[-1])["seconds_per_step"]
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
    args = p.parse_args()
    if args.long:
        print(long_sequences(args.threads))
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
    args.write.write_text("\n".join(text) + "\n" + BENCH_NOTES)
    print(f"wrote {args.write}")
    return 0


BENCH_NOTES = """
## Targets on this CPU (small: 1.8× speed, ≤0.6× RSS, ≤2% host)

The table is the last of three runs on the same day. Across them small was 1.42×, 1.56× and
1.28× (the machine is shared: flowstep's small step ranged 0.24-0.31 s, the reference's
0.37-0.39 s), host share 1.05-1.40%; 1.3B-shaped 1.82×, 1.75×, 1.93×. The first two runs had
ONNX Runtime's memory-pattern planner on (peak RSS 0.84 GB, ratio 0.62-0.63); it preallocates
one block for the whole training graph, and turning it off (the third run) brought small to
0.49 GB, **0.35×**, at unchanged speed (A/B on 3×20 steps: medians 0.27-0.31 s both ways).
So: **host work ≤2%: met. Peak RSS ≤0.6×: met (0.35×). 1.8× on small: missed (1.3-1.6×).**
On the 1.3B shape both processes are dominated by the 5.7 GB of base weights (flowstep: the
memory-mapped file plus the float32 copy it binds; ratio 0.94-0.97).

Where flowstep's small step goes (ONNX Runtime profiler, `flowstep train --ort-profile`,
training graph, 6 steps): Gemm 26%, FusedMatMul 26%, MatMul 15% (matmuls 67%, ~186 ms of
~280 ms), elementwise Mul 12% (464 nodes), Expand 7% (47 nodes), Sub/Transpose/Add ~8%,
Softmax 1%. The optimizer graph is 4 ms. What would close the gap:
- The decomposed backward of LayerNorm/RMSNorm and of the broadcast modulation
  (`x·(1+scale)+shift`) is many small Mul/Expand/ReduceSum nodes (~20% of the step); fusing
  them (hand-written backward for norm+modulate in the traced function, or an ORT graph
  transformer) is the largest non-matmul item.
- Expand nodes come from broadcasting in backward (mean -> expand); rewriting those as
  reshape-broadcast would remove ~7%.
- Memory: each ONNX Runtime session keeps its own CPU arena (training + optimizer), growing
  in powers of two; a shared arena would trim the peak further, and the base weights could
  be bound straight from the memory map when they are float32 (halving the 1.3B footprint).

## GPU (H100, one run, 2026-11-26)

`scripts/gpu_pack.sh` then `scripts/gpu_bench.sh` on a lent H100 80GB (CUDA 13, driver
580.159.04), `LATENT=16,1,60,104 STEPS=8`: Wan2.1-T2V-1.3B shape (random weights), rank-32 LoRA
(43.7 M parameters), one 480×832 latent frame (1,560 tokens) with the full 512-token context,
float32 on both sides. flowstep: ONNX Runtime 1.31.1 CUDA provider. Reference: PyTorch 2.11
eager with SDPA, `flowstep_export`'s Wan modules (equal to DiffSynth's, tested) and the same
LoRA (`reference_train --impl torch`; DiffSynth itself is not installed there). Raw output in
`benchmarks/gpu-h100-2026-11-26/`. This run predates turning the memory-pattern planner off
(see the CPU section); its effect on the CUDA arena was not measured.

| | flowstep (CUDA EP) | PyTorch eager (SDPA) | ratio |
|---|---|---|---|
| s/step (steps 3-8) | 0.777 | 0.373 | flowstep is 0.48× as fast |
| peak GPU memory (nvidia-smi) | 62.6 GB | 15.3 GB (13.7 GB allocated) | 4.1× more |
| host share of the step | 0.85% | | |

**Targets missed on GPU.** Where the time and memory go, and what would close it:
- Attention is explicit matmul + softmax in the portable graph (SDPA's fused backward has no
  ONNX form): every layer materialises [12, S, S] probabilities in float32 and keeps them for
  backward, where PyTorch's SDPA (flash/memory-efficient) keeps only O(S). At 1,560 tokens this
  is small; at 32,760 tokens (81×480×832) it would not fit at all. Closing it needs a fused
  attention with a backward: ONNX opset 23 `Attention` (no backward in ORT yet), or a custom
  op, or recompute (activation checkpointing in the graph, DESIGN.md §2: -40% memory for +26%
  time).
- ONNX Runtime's CUDA arena grows in powers of two and keeps what it took (62.6 GB is the
  arena, not live tensors); `arena_extend_strategy=kSameAsRequested` and a memory limit would
  lower the reported peak.
- Both sides run float32; DiffSynth trains in bf16. A bf16 export (weights and activations)
  would roughly halve memory and use tensor cores on both sides.
- The per-step host work (data, noise, x_t, target, binding, loss readback) is under 1%:
  the gap is inside the graph, not around it.
- Running it needed four device calls: the CUDA provider library is 284 MB (195 MB as xz),
  carried in 52 MiB parts; the benchmark itself ran in one call of 95 s.

## Step inputs on a real latent

`cargo run --release --example sft_prep`: drawing the timestep, the noise and writing x_t and
the target for a [16, 21, 60, 104] latent (81 frames at 480×832, 2.1 M values) takes a median
5.9 ms on this machine's 2 cores (11.4 ms on one). The 1.3B step on the H100 above is 0.78 s
at 1,560 tokens; at the 32,760 tokens of that latent it is far longer, so host-side step
preparation is well under 1% of a GPU step.
"""

if __name__ == "__main__":
    raise SystemExit(main())
