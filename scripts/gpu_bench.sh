#!/usr/bin/env bash
# The GPU benchmark, run on a lent GPU machine (H100/H200, CUDA 13, PyTorch there, no network):
# flowstep on ONNX Runtime's CUDA provider against the PyTorch reference on the same GPU, at
# the Wan2.1 1.3B shape and a real latent size. Results go to $OUT (bench_gpu.json, log).
#
# What it needs beside the repository (carried as ignored paths, DESIGN.md §6):
#   .gpupack/ortgpu.part*   onnxruntime-gpu 1.31.1's libraries (tar | xz, split; scripts/gpu_pack.sh)
#   .gpupack/flowstep       the release binary (stripped)
#   .gpupack/wan13b/        1.3B artifacts: training + optimizer graphs and manifest
# Random base weights (seed 0), the LoRA init (the export's seed, same code) and the dataset
# are generated there: the GPU machine has torch, and they are too large to carry.
set -euo pipefail
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
LATENT="${LATENT:-16,3,48,80}"          # [C,F,H,W]: 9 frames at 384x640 -> 2,880 tokens
STEPS="${STEPS:-12}"
exec > >(tee "$OUT/log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p /tmp/ort && cat .gpupack/ortgpu.part* | xz -d | tar x -C /tmp/ort
NV="$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$PWD/export${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - "$LATENT" <<'PY'
import hashlib, json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from flowstep_export.configs import get_config
from flowstep_export.lora import LoraConfig, inject_lora, lora_state
from flowstep_export.model import WanModel, init_random
c = get_config("wan2.1-t2v-1.3b")
m = WanModel(c); init_random(m, 0)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "/tmp/base.safetensors")
art = Path(".gpupack/wan13b")
manifest = json.loads((art / "manifest.json").read_text())
names = inject_lora(m, LoraConfig(rank=manifest["lora"]["rank"], alpha=manifest["lora"]["alpha"]), seed=0)
assert names == [t["key"] for t in manifest["lora"]["tensors"]]
lora = lora_state(m)
save_file({k: lora[k].contiguous() for k in names}, str(art / "lora_init.safetensors"))
manifest["files"]["lora_init.safetensors"] = hashlib.sha256((art / "lora_init.safetensors").read_bytes()).hexdigest()
(art / "manifest.json").write_text(json.dumps(manifest, indent=1))
C, F, H, W = map(int, sys.argv[1].split(","))
d = Path("/tmp/data"); d.mkdir(exist_ok=True)
g = torch.Generator().manual_seed(0)
for i in range(2):
    save_file({"latents": torch.randn(C, F, H, W, generator=g), "context": torch.randn(c.text_len, c.text_dim, generator=g)}, str(d / f"{i}.safetensors"))
print("base weights and data ready")
PY
peak_mem() {  # poll nvidia-smi while a command runs; prints the peak MiB used
    local log; log=$(mktemp); ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$log"; sleep 0.2; done ) &
    local poller=$! rc=0; "$@" || rc=$?; kill $poller; sort -n "$log" | tail -1 > "$OUT/peak_$(basename "$1" | tr -c 'a-z0-9\n' '_')"; return $rc
}
chmod +x .gpupack/flowstep
peak_mem .gpupack/flowstep --ort-lib /tmp/ort/libonnxruntime.so.1.31.1 -q train --artifacts .gpupack/wan13b \
    --base /tmp/base.safetensors --data /tmp/data --out /tmp/run --steps "$STEPS" --device cuda
cp /tmp/run/metrics.jsonl /tmp/run/summary.json "$OUT/"
peak_mem python3 -m flowstep_export.reference_train --impl torch --device cuda --artifacts .gpupack/wan13b \
    --base /tmp/base.safetensors --data /tmp/data --steps "$STEPS" --warmup 2 | tee "$OUT/reference.json"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rec = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][2:]
fs = sum(r["seconds"] for r in rec) / len(rec)
ref = json.loads((out / "reference.json").read_text().splitlines()[-1])
peaks = {p.name: int(p.read_text().strip() or 0) for p in out.glob("peak_*")}
summary = json.loads((out / "summary.json").read_text())
result = {"flowstep_s_per_step": fs, "reference_s_per_step": ref["seconds_per_step"], "speedup": ref["seconds_per_step"] / fs,
          "flowstep_host_fraction": summary["host_fraction"], "reference_peak_gpu_gb_torch": ref.get("peak_gpu_gb"),
          "peak_gpu_mib_nvidia_smi": peaks}
(out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY
