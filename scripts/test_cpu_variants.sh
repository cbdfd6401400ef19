#!/usr/bin/env bash
# The tests that compare committed numbers, or flowstep's fixed tables, with numbers PyTorch
# computes at run time, under other PyTorch CPU kernels and thread counts than the main run:
# a test that passes only on the machine (or instruction set) that wrote its expected values
# fails here. ATEN_CPU_CAPABILITY picks PyTorch's kernels (default = no SIMD, avx2, avx512;
# unset = the best the CPU has). ONNX Runtime and flowstep's own kernels have no such switch
# (they follow CPUID); on an AVX-512 host with CPUID faulting the avx2 variant runs through
# scripts/avx2_only.sh, so those run their AVX2 kernels too.
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
# The avx2 variant, where AVX-512 can be hidden, runs under scripts/avx2_only.sh: every
# library in pytest and in the flowstep it starts (ATen, MKL, ONNX Runtime, gemm) on AVX2.
hides_avx512() { grep -qw avx512f /proc/cpuinfo && grep -qw cpuid_fault /proc/cpuinfo; }
for name in "${chosen[@]}"; do
    variant="${variants[$name]}"
    prefix=()
    if [[ "$name" == avx2 ]] && hides_avx512; then prefix=("$root/scripts/avx2_only.sh"); fi
    echo "== $variant ${prefix[*]}"
    env $variant "${prefix[@]}" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
done
