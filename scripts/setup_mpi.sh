#!/usr/bin/env bash
# Installs MPICH (the PyPI `mpich` wheel: mpiexec and libmpi.so.12, no root, no compiler) for
# data-parallel CPU training and its tests, and prints its prefix:
#   MPI=$(scripts/setup_mpi.sh)
#   FLOWSTEP_MPI_LIB=$MPI/lib/libmpi.so.12 $MPI/bin/mpiexec -n 2 flowstep train ...
# A cluster's own MPICH-ABI MPI (MPICH, Intel MPI, Cray MPICH, MVAPICH) needs none of this.
set -euo pipefail
MPICH_VERSION=5.0.2
cache="${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}"
dest="$cache/mpich-$MPICH_VERSION"
if [[ -x "$dest/bin/mpiexec" && -f "$dest/lib/libmpi.so.12" ]]; then
    echo "$dest"; exit 0
fi
mkdir -p "$cache/wheels"
wheel=$(ls "$cache"/wheels/mpich-$MPICH_VERSION-*x86_64.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
    echo "setup_mpi: downloading mpich==$MPICH_VERSION from PyPI" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_28_x86_64 -d "$cache/wheels" "mpich==$MPICH_VERSION" >&2
    wheel=$(ls "$cache"/wheels/mpich-$MPICH_VERSION-*x86_64.whl | head -1)
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$wheel" "$tmp" >&2
rm -rf "$dest.partial"
mv "$tmp/mpich-$MPICH_VERSION.data/data" "$dest.partial"
# The zip format keeps no permissions.
chmod +x "$dest.partial"/bin/*
rm -rf "$dest"; mv "$dest.partial" "$dest"
echo "setup_mpi: installed MPICH $MPICH_VERSION in $dest" >&2
echo "$dest"
