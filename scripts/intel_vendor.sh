#!/usr/bin/env bash
# Runs a command on this CPU as if its vendor were Intel (CPUID leaf 0 says GenuineIntel; every
# feature stays as it is), through scripts/avx2_only.sh's preloaded CPUID handler with AVX-512
# kept. MKL chooses its code path by vendor: on an AMD host PyTorch's float32 products run MKL's
# generic path (222-225 GFLOP/s on 2 EPYC cores), as GenuineIntel its AVX-512 one (~480): this
# is how a comparison with PyTorch "as on an Intel CPU" is measured on an AMD host.
#   scripts/intel_vendor.sh COMMAND [ARGS...]
#   scripts/avx2_only.sh scripts/intel_vendor.sh COMMAND ...   an AVX2-only Intel CPU
# With AVX2_ONLY_REPORT=1 each process also prints "cpuid vendor: GenuineIntel in N answers".
set -euo pipefail
export AVX2_ONLY_VENDOR=GenuineIntel AVX2_ONLY_HIDE="${AVX2_ONLY_HIDE:-0}"
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/avx2_only.sh" "$@"
