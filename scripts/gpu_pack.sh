#!/usr/bin/env bash
# Prepares .gpupack/ for scripts/gpu_bench.sh, in two loads of under 64 MiB (one device call each):
#   .gpupack/ortgpu.part00          first half of onnxruntime-gpu 1.31.1 (call 1, with the PyTorch reference)
#   .gpupack/ortgpu.part01          second half (call 2, with flowstep)
#   .gpupack/flowstep               the stripped release binary
#   .gpupack/wan13b/                1.3B training + optimizer graphs and a manifest listing only them
# The CUDA provider keeps only its sm_90 (H100/H200) code (scripts/prune_cuda_fatbin.py), so
# it compresses to ~60 MB instead of 195 MB. The LoRA init and base weights are regenerated
# there from the export's seed, and the LoRA init's sha256 written into the manifest.
#   scripts/gpu_pack.sh [ARTIFACTS_DIR]   (default: the bf16, checkpointed 1.3B export of BENCHMARKS.md)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$root"
scripts/setup_ort.sh --gpu >/dev/null
mkdir -p .gpupack
if ! ls .gpupack/ortgpu.part01 >/dev/null 2>&1; then
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    python3 scripts/prune_cuda_fatbin.py .ort/gpu/libonnxruntime_providers_cuda.so "$tmp/libonnxruntime_providers_cuda.so" 90
    cp .ort/gpu/libonnxruntime.so.1.31.1 .ort/gpu/libonnxruntime_providers_shared.so "$tmp/"
    (cd "$tmp" && tar cf - libonnxruntime.so.1.31.1 libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so) \
        | xz -T0 -9 > "$tmp/ortgpu.tar.xz"
    half=$(( ($(stat -c %s "$tmp/ortgpu.tar.xz") + 1) / 2 ))
    split -b "$half" -d "$tmp/ortgpu.tar.xz" .gpupack/ortgpu.part
fi
cargo build --release --locked 2>&1 | tail -n 1
strip -o .gpupack/flowstep target/release/flowstep
src="${1:-$HOME/.cache/flowstep/bench/wan13b-bf16-ck-c1024}"
rm -rf .gpupack/wan13b && mkdir -p .gpupack/wan13b
cp "$src"/training_model.onnx "$src"/optimizer_model.onnx .gpupack/wan13b/
python3 - "$src" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
keep = ("training_model", "optimizer_model")
m["graphs"] = {k: v for k, v in m["graphs"].items() if k in keep}
m["files"] = {k: v for k, v in m["files"].items() if k in ("training_model.onnx", "optimizer_model.onnx", "lora_init.safetensors")}
m["base_weights"]["file"] = None
json.dump(m, open(".gpupack/wan13b/manifest.json", "w"), indent=1)
PY
du -sh .gpupack/*
