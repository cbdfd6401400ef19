#!/usr/bin/env bash
# Runs every test: sets up ONNX Runtime, the pinned Python environment and MPICH (cached
# under ~/.cache/flowstep), builds flowstep, then the Rust tests and the Python export tests
# (in two streams, one per core).
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

echo "== pytest (export/): two streams side by side, one PyTorch thread each"
export FLOWSTEP_BIN="$root/target/release/flowstep"
logs="$(mktemp -d)"
# Stream a: the files that share the VAE decoder and tiny-I2V exports (session fixtures in
# export/tests/conftest.py); stream b: every other file (new
# files land there). Each stream then runs one of scripts/test_cpu_variants.sh's variants.
stream_a=(tests/test_hostile_tools.py tests/test_vae_decoder.py tests/test_videos_end_to_end.py tests/test_variants.py
          tests/test_tensorboard_events.py tests/test_prepare_i2v.py)
run_stream() {
    local name=$1 variant=$2; shift 2
    (cd export && OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q --basetemp="$logs/$name" --durations=12 "$@" \
        && PYTEST_ADDOPTS="--basetemp=$logs/$name-$variant" "$root/scripts/test_cpu_variants.sh" "$variant") >"$logs/$name.log" 2>&1
}
run_stream a default "${stream_a[@]}" & pid_a=$!
run_stream b avx2 "${stream_a[@]/#/--ignore=}" & pid_b=$!
status=0
wait "$pid_a" || status=1
echo "-- stream a"; cat "$logs/a.log"
wait "$pid_b" || status=1
echo "-- stream b"; cat "$logs/b.log"
rm -rf "$logs"
exit "$status"
