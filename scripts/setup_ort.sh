#!/usr/bin/env bash
# Installs the pinned ONNX Runtime shared library where flowstep looks for it:
#   scripts/setup_ort.sh          CPU build   -> .ort/cpu/libonnxruntime.so  (PyPI onnxruntime)
#   scripts/setup_ort.sh --gpu    CUDA + TensorRT providers -> .ort/gpu/     (PyPI onnxruntime-gpu)
# The wheel is cached under ~/.cache/flowstep/wheels; the C library inside it has the C API
# exported and no Python dependency.
set -euo pipefail
ORT_VERSION=1.31.1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavour=cpu package=onnxruntime
if [[ "${1:-}" == "--gpu" ]]; then flavour=gpu package=onnxruntime-gpu; fi
dest="$root/.ort/$flavour"
if [[ -f "$dest/libonnxruntime.so" && "$(cat "$dest/VERSION" 2>/dev/null)" == "$ORT_VERSION" ]]; then
    echo "$dest/libonnxruntime.so"; exit 0
fi
cache="${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}/wheels"
mkdir -p "$cache"
wheel=$(ls "$cache"/${package//-/_}-$ORT_VERSION-*manylinux*x86_64.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
    echo "setup_ort: downloading $package==$ORT_VERSION from PyPI" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$cache" "$package==$ORT_VERSION" >&2
    wheel=$(ls "$cache"/${package//-/_}-$ORT_VERSION-*x86_64.whl | head -1)
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$wheel" "$tmp" >&2
rm -rf "$dest"; mkdir -p "$dest"
cp "$tmp"/onnxruntime/capi/libonnxruntime.so.* "$dest/"
cp "$tmp"/onnxruntime/capi/libonnxruntime_providers_*.so "$dest/" 2>/dev/null || true
ln -sf "$(basename "$(ls "$dest"/libonnxruntime.so.*)")" "$dest/libonnxruntime.so"
echo "$ORT_VERSION" > "$dest/VERSION"
echo "setup_ort: installed $package $ORT_VERSION in $dest" >&2
echo "$dest/libonnxruntime.so"
