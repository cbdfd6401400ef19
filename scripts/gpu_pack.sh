#!/usr/bin/env bash
# Prepares .gpupack/ for scripts/gpu_bench.sh: the onnxruntime-gpu libraries (xz, split in
# 52 MiB parts so each device call carries under 64 MiB), the stripped binary and the 1.3B
# training + optimizer graphs with a manifest that lists only them. The LoRA init (175 MB at
# rank 32) is regenerated there from the same seed, and its sha256 written into the manifest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$root"
scripts/setup_ort.sh --gpu >/dev/null
mkdir -p .gpupack
if ! ls .gpupack/ortgpu.part* >/dev/null 2>&1; then
    (cd .ort/gpu && tar cf - libonnxruntime.so.1.31.1 libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so) \
        | xz -T0 -6 | split -b 52M -d - .gpupack/ortgpu.part
fi
cargo build --release --locked 2>&1 | tail -n 1
strip -o .gpupack/flowstep target/release/flowstep
src="${1:-$HOME/.cache/flowstep/bench/artifacts-wan2.1-t2v-1.3b-r32}"
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
