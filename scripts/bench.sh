#!/usr/bin/env bash
# Benchmarks flowstep against the PyTorch reference on this machine and writes BENCHMARKS.md.
#   scripts/bench.sh [--threads N] [--configs tiny,small,1.3B-shaped]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup_ort.sh >/dev/null
venv="$(scripts/setup_python.sh)"
cargo build --release --locked 2>&1 | tail -n 1
exec "$venv/bin/python" scripts/bench.py "$@"
