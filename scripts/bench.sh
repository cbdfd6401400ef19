#!/usr/bin/env bash
# Benchmarks flowstep against the PyTorch reference on this machine (sets up ONNX Runtime and
# Python, builds flowstep, then runs the Python benchmark):
#   scripts/bench.sh [--threads N] [--configs tiny,small,1.3B-shaped]
#       whole training steps; writes BENCHMARKS.md's table (scripts/bench.py)
#   scripts/bench.sh attention [--model small] [--latents 5x32x32,16x64x64] [--steps 12,3] [--rounds 3] [--threads 2] [--json FILE] [--avx2-only] [--mkl-as-on-intel]
#       chunked vs fused attention vs PyTorch (ATen's own kernels and avx2), interleaved; prints
#       a markdown table, about 15 minutes with defaults (scripts/bench_cpu_attention.py)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
script=scripts/bench.py
if [[ "${1:-}" == attention ]]; then script=scripts/bench_cpu_attention.py; shift; fi
scripts/setup_ort.sh >/dev/null
venv="$(scripts/setup_python.sh)"
cargo build --release --locked 2>&1 | tail -n 1
exec "$venv/bin/python" "$script" "$@"
