#!/usr/bin/env bash
# One-step install: flowstep on PATH, the export package importable from any directory, ffmpeg.
#   scripts/install.sh [--gpu]
# - ONNX Runtime (scripts/setup_ort.sh; --gpu: also the CUDA/TensorRT build) and the release binary
#   (cargo build --release --locked), linked as BIN_DIR/flowstep (a symbolic link to
#   target/release/flowstep, so a later `cargo build --release` updates it).
# - The pinned Python environment (scripts/setup_python.sh, ~5 GB the first time) with
#   export/ on its path (a flowstep_export.pth in its site-packages), so that
#   `$VENV/bin/python -m flowstep_export ...` works from any directory (VENV=$(scripts/setup_python.sh)).
# - ffmpeg (for prepare's video decoding and sample's MP4s): when none is on PATH, BIN_DIR/ffmpeg
#   links to the binary of the pinned imageio-ffmpeg wheel.
# BIN_DIR is $FLOWSTEP_BIN_DIR, default ~/.local/bin. FLOWSTEP_VENV names an existing Python
# environment to use instead of the pinned one (see scripts/setup_python.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$root"
bin_dir="${FLOWSTEP_BIN_DIR:-$HOME/.local/bin}"
gpu=false
case "${1:-}" in
    "") ;;
    --gpu) gpu=true ;;
    *) echo "install: unknown option $1 (usage: scripts/install.sh [--gpu])" >&2; exit 2 ;;
esac

echo "== ONNX Runtime and the flowstep binary"
scripts/setup_ort.sh >/dev/null
if $gpu; then scripts/setup_ort.sh --gpu >/dev/null; fi
cargo build --release --locked 2>&1 | tail -n 1
mkdir -p "$bin_dir"
ln -sfn "$root/target/release/flowstep" "$bin_dir/flowstep"
echo "flowstep -> $bin_dir/flowstep"

echo "== the Python export package"
venv="$(scripts/setup_python.sh)"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root/export" > "$site/flowstep_export.pth"
echo "flowstep_export -> $venv (python -m flowstep_export works from any directory)"

echo "== ffmpeg"
existing="$(command -v ffmpeg || true)"
if [[ -n "$existing" && "$existing" != "$bin_dir/ffmpeg" ]]; then
    echo "ffmpeg on PATH: $existing"
else
    ffmpeg="$("$venv/bin/python" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')"
    ln -sfn "$ffmpeg" "$bin_dir/ffmpeg"
    echo "ffmpeg -> $bin_dir/ffmpeg (imageio-ffmpeg's $ffmpeg)"
fi

case ":$PATH:" in
    *":$bin_dir:"*) echo "done: flowstep and ffmpeg are on PATH" ;;
    *) echo "done; add $bin_dir to PATH:  export PATH=\"$bin_dir:\$PATH\"" ;;
esac
