#!/usr/bin/env bash
# Issue 25's measurement: chunked vs fused flowstep vs the PyTorch reference (ATen's own CPU
# capability and avx2), interleaved; prints a markdown table. About 15 minutes with defaults.
#   scripts/bench_cpu_attention.sh [--model small] [--latents 5x32x32,16x64x64] [--steps 12,3] [--rounds 3] [--threads 2]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup_ort.sh >/dev/null
venv="$(scripts/setup_python.sh)"
cargo build --release --locked 2>&1 | tail -n 1
exec "$venv/bin/python" scripts/bench_cpu_attention.py "$@"
