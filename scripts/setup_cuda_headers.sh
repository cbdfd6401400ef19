#!/usr/bin/env bash
# Installs the headers that `cargo build --features cuda-attention` needs to compile the cuDNN
# attention shim (csrc/) on a machine with no GPU and no CUDA toolkit, from PyPI wheels:
#   nvidia-cudnn-frontend   header-only cudnn_frontend.h and its include/ tree
#   nvidia-cudnn-cu13       cudnn*.h
#   nvidia-cuda-runtime     cuda_runtime*.h;  nvidia-cuda-crt: crt/*.h, which they include
#   nvidia-cuda-cccl        nv/target, which cuda_fp16.h / cuda_bf16.h include
#   nvidia-cuda-nvrtc       nvrtc.h, which cudnn-frontend's runtime-compiled engines include
# into .cuda/include and prints .cuda (build.rs reads it, or FLOWSTEP_CUDA_HEADERS). Nothing is
# linked: the shim dlopens libcudnn.so.9 / libcudart.so.13 at run time. The wheels are cached
# under ~/.cache/flowstep/wheels keyed by version; the cuDNN wheel is ~520 MB (only its headers
# are unpacked), the others 50 MB together.
set -euo pipefail
CUDNN_FRONTEND_VERSION=1.32.0
CUDNN_VERSION=9.26.0.51
CUDA_RUNTIME_VERSION=13.2.86
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
stamp="v3 frontend $CUDNN_FRONTEND_VERSION cudnn $CUDNN_VERSION cuda-runtime $CUDA_RUNTIME_VERSION"
if [[ -f "$dest/include/cudnn_frontend.h" && "$(cat "$dest/VERSION" 2>/dev/null)" == "$stamp" ]]; then
    echo "$dest"; exit 0
fi
cache="${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}/wheels"
mkdir -p "$cache"
wheel() {  # wheel PACKAGE VERSION: the cached wheel's path, downloaded once
    local file
    file=$(ls "$cache"/${1//-/_}-$2-*x86_64*.whl 2>/dev/null | head -1 || true)
    if [[ -z "$file" ]]; then
        echo "setup_cuda_headers: downloading $1==$2 from PyPI" >&2
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 \
            -d "$cache" "$1==$2" >&2
        file=$(ls "$cache"/${1//-/_}-$2-*x86_64*.whl | head -1)
    fi
    echo "$file"
}
frontend=$(wheel nvidia-cudnn-frontend "$CUDNN_FRONTEND_VERSION")
cudnn=$(wheel nvidia-cudnn-cu13 "$CUDNN_VERSION")
runtime=$(wheel nvidia-cuda-runtime "$CUDA_RUNTIME_VERSION")
crt=$(wheel nvidia-cuda-crt "$CUDA_RUNTIME_VERSION")
cccl=$(wheel nvidia-cuda-cccl "$CUDA_RUNTIME_VERSION")
nvrtc=$(wheel nvidia-cuda-nvrtc "$CUDA_RUNTIME_VERSION")
rm -rf "$dest"; mkdir -p "$dest/include"
# extract WHEEL PREFIX DEST [NAME...]: files under PREFIX (only the NAMEs, if given) into DEST.
extract() {
    python3 - "$@" <<'PY'
import sys, zipfile, pathlib
wheel, prefix, dest, names = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), set(sys.argv[4:])
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        rel = info.filename[len(prefix):]
        if not info.filename.startswith(prefix) or info.is_dir() or (names and rel not in names):
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(info))
PY
}
extract "$frontend" include/ "$dest/include"
extract "$cudnn" nvidia/cudnn/include/ "$dest/include"
extract "$runtime" nvidia/cu13/include/ "$dest/include"
extract "$crt" nvidia/cu13/include/ "$dest/include"
extract "$cccl" nvidia/cu13/include/nv/ "$dest/include/nv"
extract "$nvrtc" nvidia/cu13/include/ "$dest/include" nvrtc.h
echo "$stamp" > "$dest/VERSION"
echo "setup_cuda_headers: installed $stamp in $dest" >&2
echo "$dest"
