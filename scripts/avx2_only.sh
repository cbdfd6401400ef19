#!/usr/bin/env bash
# Runs a command as it would run on an AVX2-only CPU, on an AVX-512 host: scripts/avx2_only.c
# (built once, cached under ~/.cache/flowstep) is preloaded and hides AVX-512, AVX10 and AMX
# from CPUID, and glibc's tunables hide them from glibc's own dispatch. Needs Linux's CPUID
# faulting (the cpuid_fault flag in /proc/cpuinfo).
#   scripts/avx2_only.sh COMMAND [ARGS...]
#   AVX2_ONLY_REPORT=1 scripts/avx2_only.sh ...   each process prints at exit how many CPUID
#                                                 answers it masked (0: nothing was hidden)
# scripts/intel_vendor.sh runs through this too (AVX2_ONLY_HIDE=0, AVX2_ONLY_VENDOR); both
# together, `scripts/avx2_only.sh scripts/intel_vendor.sh CMD`, are an AVX2-only Intel CPU.
set -euo pipefail
source_file="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/avx2_only.c"
if ! grep -qw cpuid_fault /proc/cpuinfo; then
    echo "avx2_only.sh: this machine has no CPUID faulting (no cpuid_fault in /proc/cpuinfo), so AVX-512 cannot be hidden" >&2
    exit 1
fi
cache="${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}"
library="$cache/avx2_only-$(sha256sum "$source_file" | cut -c1-10).so"
if [[ ! -f "$library" ]]; then
    mkdir -p "$cache"
    cc -O2 -Wall -shared -fPIC -o "$library.$$" "$source_file"
    mv "$library.$$" "$library"
fi
export LD_PRELOAD="$library${LD_PRELOAD:+ $LD_PRELOAD}"
export AVX2_ONLY_HIDE="${AVX2_ONLY_HIDE:-1}"
if [[ "$AVX2_ONLY_HIDE" != 0 ]]; then
    export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512DQ,-AVX512CD,-AVX512BW,-AVX512VL,-AVX512ER,-AVX512PF${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
fi
exec "$@"
