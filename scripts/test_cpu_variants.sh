#!/usr/bin/env bash
# The tests that compare committed numbers, or flowstep's fixed tables, with numbers PyTorch
# computes at run time, under other PyTorch CPU kernels and thread counts than the main run:
# a test that passes only on the machine (or instruction set) that wrote its expected values
# fails here. ATEN_CPU_CAPABILITY picks PyTorch's kernels (default = no SIMD, avx2, avx512;
# unset = the best the CPU has); ONNX Runtime has no such switch (its kernels follow the CPU).
#   scripts/test_cpu_variants.sh          the goldens and reference-loop tests under both variants
#   scripts/test_cpu_variants.sh default  ... under one (scripts/test.sh runs each in its own stream)
#   scripts/test_cpu_variants.sh --all    the whole Python suite under each variant (~30 min)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/setup_python.sh")"
export FLOWSTEP_BIN="${FLOWSTEP_BIN:-$root/target/release/flowstep}"
tests=(tests/test_schedule_reference.py tests/test_reference_loop.py tests/test_timestep_sampling.py
       tests/test_loss_weight_and_drift.py::test_committed_tiny_artifacts_equal_a_fresh_export
       tests/test_loss_weight_and_drift.py::test_committed_goldens_equal_regenerated_ones)
# No-SIMD kernels on one thread; AVX2 kernels on every core. (The main run: the best the CPU has.)
declare -A variants=([default]="ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1" [avx2]="ATEN_CPU_CAPABILITY=avx2")
chosen=(default avx2)
case "${1:-}" in
    --all) tests=() ;;
    default|avx2) chosen=("$1") ;;
    "") ;;
    *) echo "usage: $0 [--all | default | avx2]" >&2; exit 2 ;;
esac
cd "$root/export"
for name in "${chosen[@]}"; do
    variant="${variants[$name]}"
    echo "== $variant"
    env $variant "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
done
