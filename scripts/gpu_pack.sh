#!/usr/bin/env bash
# Prepares .gpupack/ for scripts/gpu_bench.sh, whose two device calls each carry under 64 MiB:
#   .gpupack/ortgpu.part00           first half of onnxruntime-gpu 1.31.1 (call 1)
#   .gpupack/ortgpu.part01           second half (call 2)
#   .gpupack/flowstep-cuda.tar.xz    (both calls, ~3 MB) flowstep built with --features cuda-attention,
#                                    libflowstep_sdpa.so, the GPU parity test binary
#                                    (tests/cuda_attention_parity.rs), and the 1.3B training + optimizer
#                                    graphs with manifests listing only them: wan13b/ (chunked
#                                    attention) and wan13b-fused/ (--attention fused)
# The CUDA provider keeps only its sm_90 (H100/H200) code (scripts/prune_cuda_fatbin.py), so
# it compresses to ~60 MB instead of 195 MB. The LoRA init and base weights are regenerated
# there from the export's seed, and the LoRA init's sha256 written into the manifest.
#   CHUNKED=DIR FUSED=DIR scripts/gpu_pack.sh
# Defaults: the bf16, checkpointed 1.3B exports under ~/.cache/flowstep/bench (BENCHMARKS.md),
# keyed by a hash of the exporter's sources and exported here when missing (~10 min each on 2
# CPU cores, 10 GB of memory): an export from an older exporter is never packed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$root"
bench="${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}/bench"
key="$(find export/flowstep_export -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-10)"
chunked="${CHUNKED:-$bench/wan13b-bf16-ck-c1024-$key}"
fused="${FUSED:-$bench/wan13b-bf16-ck-fused-$key}"
scripts/setup_ort.sh --gpu >/dev/null
scripts/setup_cuda_headers.sh >/dev/null
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
for pair in "$chunked:--attention-chunk 1024" "$fused:--attention fused"; do
    dir="${pair%%:*}" flags="${pair#*:}"
    [[ -f "$dir/manifest.json" ]] && continue
    venv="$(scripts/setup_python.sh)"
    echo "gpu_pack: exporting the 1.3B graphs ($flags) into $dir" >&2
    # shellcheck disable=SC2086
    (cd export && "$venv/bin/python" -m flowstep_export --model wan2.1-t2v-1.3b --out "$dir" --lora-rank 32 \
        --precision bfloat16 --gradient-checkpointing $flags --graphs training_model,optimizer_model --no-validate -q)
done
cargo build --release --locked --features cuda-attention 2>&1 | tail -n 1
parity=$(cargo test --release --locked --features cuda-attention --test cuda_attention_parity --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys; print(next(m["executable"] for m in map(json.loads, sys.stdin)
                                             if m.get("executable") and m["target"]["name"] == "cuda_attention_parity"))') \
    || { echo "gpu_pack: building the GPU parity test failed; run: cargo test --release --features cuda-attention --test cuda_attention_parity --no-run" >&2; exit 1; }
stage="$(mktemp -d)"
strip -o "$stage/flowstep" target/release/flowstep
strip -o "$stage/libflowstep_sdpa.so" target/release/libflowstep_sdpa.so
strip -o "$stage/cuda_attention_parity" "$parity"
for pair in "wan13b:$chunked" "wan13b-fused:$fused"; do
    name="${pair%%:*}" src="${pair#*:}"
    mkdir -p "$stage/$name"
    cp "$src"/training_model.onnx "$src"/optimizer_model.onnx "$stage/$name/"
    python3 - "$src" "$stage/$name" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
keep = ("training_model", "optimizer_model")
m["graphs"] = {k: v for k, v in m["graphs"].items() if k in keep}
m["files"] = {k: v for k, v in m["files"].items() if k in ("training_model.onnx", "optimizer_model.onnx", "lora_init.safetensors")}
m["base_weights"]["file"] = None
json.dump(m, open(f"{sys.argv[2]}/manifest.json", "w"), indent=1)
PY
done
tar -C "$stage" -cf - . | xz -T0 -9 > .gpupack/flowstep-cuda.tar.xz
rm -rf "$stage" .gpupack/flowstep .gpupack/wan13b
du -sh .gpupack/*
