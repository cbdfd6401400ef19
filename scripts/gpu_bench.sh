#!/usr/bin/env bash
# The GPU checks and benchmark on a lent H100/H200 (CUDA 13, PyTorch there, no network), in two
# device calls because the CUDA provider library travels in two parts (scripts/gpu_pack.sh):
#   scripts/gpu_bench.sh reference   call 1 (carry .gpupack/ortgpu.part00, .gpupack/flowstep-cuda.tar.xz):
#                                    base weights, data, the attention parity cases
#                                    (scripts/gpu_attention_parity.py), PyTorch bf16 SDPA + DiffSynth-style
#                                    gradient checkpointing at each size
#   scripts/gpu_bench.sh flowstep    call 2 (carry .gpupack/ortgpu.part01, .gpupack/flowstep-cuda.tar.xz):
#                                    the CUDA attention operators vs PyTorch (tests/cuda_attention_parity.rs),
#                                    flowstep fused and chunked on the CUDA provider, ONNX Runtime
#                                    profiles (attention's share), the result table
# Call 2 needs call 1's /tmp (same warm machine). Wan2.1-T2V-1.3B shape (random weights, seed 0),
# rank-32 LoRA, bf16, at 32,760 tokens (81 frames at 480x832) and 14,040 (33 frames), largest
# first. Results in $OUT (bench_gpu.json, parity.jsonl, profile_*.txt, logs). Call 2 stops
# starting new runs after BUDGET seconds (default 420), so that both calls and the machine's
# start fit the 15 minutes of device time. REFERENCE=0 skips call 1's PyTorch runs (then the
# summary has no PyTorch column; use an earlier run on the same card).
set -euo pipefail
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
SIZES="${SIZES:-16,21,60,104 16,9,60,104}"
STEPS="${STEPS:-4}"
BUDGET="${BUDGET:-420}"
REFERENCE="${REFERENCE:-1}"
phase="${1:?reference or flowstep}"
exec > >(tee -a "$OUT/log-$phase") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD/export${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FS=/tmp/fs   # flowstep, libflowstep_sdpa.so, cuda_attention_parity, wan13b/, wan13b-fused/

tokens() { local IFS=,; set -- $1; echo $(( $2 * ($3 / 2) * ($4 / 2) )); }

peak_mem() {  # poll nvidia-smi while a command runs; writes the peak MiB used to $1
    local out=$1; shift
    local log; log=$(mktemp); ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$log"; sleep 0.2; done ) &
    local poller=$! rc=0; "$@" || rc=$?; kill $poller; sort -n "$log" | tail -1 > "$out"; return $rc
}

unpack() {  # the flowstep pack, once per machine
    [[ -x "$FS/flowstep" ]] && return
    mkdir -p "$FS" && xz -d < .gpupack/flowstep-cuda.tar.xz | tar x -C "$FS"
}

prepare() {  # base weights (bf16) and one sample per size, once per machine
    [[ -f /tmp/base.safetensors ]] && return
    python3 - "$SIZES" <<'PY'
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from flowstep_export.model.configs import get_config
from flowstep_export.model.model import WanModel, init_random
c = get_config("wan2.1-t2v-1.3b")
m = WanModel(c); init_random(m, 0)
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}, "/tmp/base.safetensors")
for size in sys.argv[1].split():
    C, F, H, W = map(int, size.split(","))
    d = Path(f"/tmp/data-{F}x{H}x{W}"); d.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(C, F, H, W, generator=g), "context": torch.randn(c.text_len, c.text_dim, generator=g).to(torch.bfloat16)},
              str(d / "0.safetensors"))
print("base weights and data ready")
PY
}

lora_init() {  # lora_init ART: the export's LoRA init (seed 0, 175 MB: regenerated rather than carried)
    [[ -f "$1/lora_init.safetensors" ]] && return
    python3 - "$1" <<'PY'
import hashlib, json, sys
from pathlib import Path
from safetensors.torch import save_file
from flowstep_export.model.configs import get_config
from flowstep_export.model.lora import LoraConfig, inject_lora, lora_state
from flowstep_export.model.model import WanModel
art = Path(sys.argv[1])
manifest = json.loads((art / "manifest.json").read_text())
m = WanModel(get_config("wan2.1-t2v-1.3b"))
names = inject_lora(m, LoraConfig(rank=manifest["lora"]["rank"], alpha=manifest["lora"]["alpha"]), seed=0)
assert names == [t["key"] for t in manifest["lora"]["tensors"]]
lora = lora_state(m)
save_file({k: lora[k].contiguous() for k in names}, str(art / "lora_init.safetensors"))
manifest["files"]["lora_init.safetensors"] = hashlib.sha256((art / "lora_init.safetensors").read_bytes()).hexdigest()
(art / "manifest.json").write_text(json.dumps(manifest, indent=1))
PY
}

if [[ "$phase" == reference ]]; then
    unpack
    prepare
    lora_init "$FS/wan13b"
    timeout 180 python3 scripts/gpu_attention_parity.py /tmp/parity || echo "attention parity cases failed"
    [[ "$REFERENCE" == 1 ]] || exit 0
    for size in $SIZES; do
        IFS=, read -r C F H W <<< "$size"; t=$(tokens "$size")
        peak_mem "$OUT/peak_reference_$t" python3 -m flowstep_export.reference.reference_train --impl torch --device cuda \
            --artifacts "$FS/wan13b" --base /tmp/base.safetensors --data "/tmp/data-${F}x${H}x${W}" --steps "$STEPS" --warmup 1 \
            --precision bfloat16 --gradient-checkpointing | tee "$OUT/reference_$t.json" || echo "reference at $t tokens failed"
    done
    # For the summary in call 2 ($OUT is emptied between calls; /tmp stays while the machine is warm).
    mkdir -p /tmp/ref-results && cp "$OUT"/reference_* "$OUT"/peak_reference_* /tmp/ref-results/ 2>/dev/null || true
    exit 0
fi

deadline=$(( SECONDS + BUDGET ))
within() {  # within LIMIT CMD...: runs CMD under min(LIMIT, time left) seconds, or skips it
    local left=$(( deadline - SECONDS )) limit=$1; shift
    if (( left < 30 )); then echo "skipped (budget spent): $*"; return 1; fi
    timeout $(( limit < left ? limit : left )) "$@"
}
unpack
prepare
lora_init "$FS/wan13b"
lora_init "$FS/wan13b-fused"
if [[ ! -f .gpupack/ortgpu.part00 ]]; then
    echo "call 1 (scripts/gpu_bench.sh reference) did not run on this machine: no .gpupack/ortgpu.part00"
    exit 1
fi
mkdir -p /tmp/ort && cat .gpupack/ortgpu.part* | xz -d | tar x -C /tmp/ort
NV="$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH=/tmp/ort/libonnxruntime.so.1.31.1
# 1. The operators against PyTorch's flash SDPA and float32 autograd (call 1's cases).
FLOWSTEP_PARITY_DIR=/tmp/parity FLOWSTEP_PARITY_OUT="$OUT" FLOWSTEP_SDPA_LIB="$FS/libflowstep_sdpa.so" \
    within 150 "$FS/cuda_attention_parity" --ignored --nocapture --test-threads=1 || echo "attention parity failed"
# 2. Timed training, fused then chunked at each size, largest first.
train() {  # train VARIANT TOKENS DATA LIMIT [flags]: one run; metrics and peak GPU memory to $OUT
    local variant=$1 t=$2 data=$3 limit=$4; shift 4
    local art="$FS/wan13b"; [[ "$variant" == fused ]] && art="$FS/wan13b-fused"
    rm -rf "/tmp/run-$variant-$t"
    peak_mem "$OUT/peak_${variant}_$t" within "$limit" "$FS/flowstep" --ort-lib "$ORT_DYLIB_PATH" -q train --artifacts "$art" \
        --base /tmp/base.safetensors --data "$data" --out "/tmp/run-$variant-$t" --steps "$STEPS" --device cuda "$@"
}
for size in $SIZES; do
    IFS=, read -r C F H W <<< "$size"; t=$(tokens "$size")
    limit=$(( t > 20000 ? 220 : 150 ))
    for variant in fused chunked; do
        # Strict placement first: a compute node without a CUDA kernel refuses to load.
        if ! train "$variant" "$t" "/tmp/data-${F}x${H}x${W}" "$limit"; then
            echo "flowstep $variant at $t tokens failed (see above)"
        fi
        cp "/tmp/run-$variant-$t/metrics.jsonl" "$OUT/metrics_${variant}_$t.jsonl" 2>/dev/null || true
    done
done
# 3. Where the time goes: a 2-step profile per variant at the largest size.
first=${SIZES%% *}; IFS=, read -r C F H W <<< "$first"
for variant in fused chunked; do
    art="$FS/wan13b"; [[ "$variant" == fused ]] && art="$FS/wan13b-fused"
    rm -rf "/tmp/run-prof-$variant" /tmp/prof-"$variant"*
    within 150 "$FS/flowstep" --ort-lib "$ORT_DYLIB_PATH" -q train --artifacts "$art" --base /tmp/base.safetensors \
        --data "/tmp/data-${F}x${H}x${W}" --out "/tmp/run-prof-$variant" --steps 2 --device cuda --ort-profile "/tmp/prof-$variant" \
        && python3 scripts/ort_profile_summary.py /tmp/prof-"$variant"*.json > "$OUT/profile_$variant.txt" 2>&1 \
        || echo "profiled $variant run failed"
done
python3 - "$OUT" "$SIZES" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); refs = Path("/tmp/ref-results"); result = {}

def steps(path):  # metrics.jsonl records after the first (warm-up) step
    return [json.loads(l) for l in path.read_text().splitlines() if '"seconds"' in l][1:] if path.exists() else []

for size in sys.argv[2].split():
    C, F, H, W = map(int, size.split(",")); t = F * (H // 2) * (W // 2)
    row = {}
    for variant in ("fused", "chunked"):
        rec = steps(out / f"metrics_{variant}_{t}.jsonl")
        if rec:
            row[f"{variant}_s_per_step"] = sum(r["seconds"] for r in rec) / len(rec)
            row[f"{variant}_losses"] = [r["loss"] for r in rec]
    r = refs / f"reference_{t}.json"
    if r.exists() and r.read_text().strip():
        ref = json.loads(r.read_text().strip().splitlines()[-1])
        row["reference_s_per_step"] = ref["seconds_per_step"]; row["reference_peak_allocated_gb"] = ref.get("peak_gpu_gb")
    for who, where in (("fused", out), ("chunked", out), ("reference", refs)):
        p = where / f"peak_{who}_{t}"
        if p.exists() and p.read_text().strip():
            row[f"{who}_peak_nvidia_smi_gb"] = int(p.read_text()) / 1024
    for variant in ("fused", "chunked"):
        if f"{variant}_s_per_step" in row and "reference_s_per_step" in row:
            row[f"{variant}_speedup_vs_pytorch"] = row["reference_s_per_step"] / row[f"{variant}_s_per_step"]
    if "fused_losses" in row and "chunked_losses" in row:
        row["fused_vs_chunked_max_loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(row["fused_losses"], row["chunked_losses"]))
    result[t] = row
for variant in ("fused", "chunked"):
    p = out / f"profile_{variant}.txt"
    if p.exists():
        share = [l for l in p.read_text().splitlines() if l.startswith("attention share")]
        result[f"profile_{variant}"] = share[0] if share else None
(out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY
