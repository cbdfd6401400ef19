#!/usr/bin/env bash
# Runs every test: sets up ONNX Runtime, the pinned Python environment and MPICH (cached
# under ~/.cache/flowstep), builds flowstep, then the Rust tests and the Python export tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "== setup"
scripts/setup_ort.sh >/dev/null
venv="$(scripts/setup_python.sh)"
# MPICH for the data-parallel tests (tests/data_parallel.rs), cached under ~/.cache/flowstep.
export FLOWSTEP_MPI_PREFIX="$(scripts/setup_mpi.sh)"

echo "== cargo build"
cargo build --release --locked 2>&1 | tail -n 3

echo "== cargo test"
cargo test --release --locked -- --test-threads=2

echo "== pytest (export/)"
export FLOWSTEP_BIN="$root/target/release/flowstep"
(cd export && "$venv/bin/python" -m pytest -q)

echo "== pytest under other PyTorch CPU kernels and thread counts"
scripts/test_cpu_variants.sh
