#!/usr/bin/env bash
# Data parallelism on one NVIDIA GPU, in one device call (NOT YET RUN on a GPU):
#   1. 2 torchrun ranks sharing GPU 0 through NCCL (NCCL >= 2.30 with
#      NCCL_MULTI_RANK_GPU_ENABLE=1) equal 1 process with --grad-accum 2 on the tiny model:
#      the same losses and the same LoRA (two ranks sum g0 + g1, as the graph does);
#   2. the all-reduce time for the Wan2.1 1.3B rank-32 LoRA gradient (167 MiB) and the 14B
#      one (586 MiB) between those 2 ranks (flowstep allreduce-bench).
# Needs: target/release/flowstep, the onnxruntime-gpu library (scripts/setup_ort.sh --gpu, or
# ORT_LIB=DIR with libonnxruntime.so.1.31.1 and its CUDA provider), and a PyTorch install
# whose nvidia-nccl-cu13 wheel gives libnccl.so.2 and whose torchrun launches the ranks.
# Results in $OUT: losses.json, allreduce.jsonl, log.
set -euo pipefail
OUT="${OUT:-/tmp/gpu-dp-out}"; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
FLOWSTEP="$root/target/release/flowstep"
ORT_DIR="${ORT_LIB:-$root/.ort/gpu}"
nccl_lib="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')"
cudart_lib="$(python3 -c 'import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="$nccl_lib:$cudart_lib:$ORT_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_MULTI_RANK_GPU_ENABLE=1
python3 -c 'import ctypes; v = ctypes.c_int(); ctypes.CDLL("libnccl.so.2").ncclGetVersion(ctypes.byref(v)); print("NCCL", v.value)'
# Both ranks on GPU 0: torchrun gives rank 1 LOCAL_RANK=1, which flowstep maps to GPU 1.
same_gpu=(bash -c 'LOCAL_RANK=0 exec "$0" "$@"' "$FLOWSTEP")
ort=(--ort-lib "$ORT_DIR/libonnxruntime.so.1.31.1")

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
python3 - "$work/data" <<'PY'
import sys, numpy as np
from pathlib import Path
from safetensors.numpy import save_file
d = Path(sys.argv[1]); d.mkdir()
rng = np.random.default_rng(0)
for i in range(4):
    save_file({"latents": rng.standard_normal((16, 2, 8, 8), dtype=np.float32),
               "context": rng.standard_normal((16, 64), dtype=np.float32)}, str(d / f"sample-{i:03}.safetensors"))
PY
train=(train --artifacts models/tiny/artifacts --data "$work/data" --steps 4 --seed 5 --lr 2e-3 --device cuda)
"$FLOWSTEP" "${ort[@]}" -q "${train[@]}" --out "$work/one" --grad-accum 2
torchrun --standalone --nproc-per-node 2 --no-python "${same_gpu[@]}" "${ort[@]}" -q "${train[@]}" --out "$work/ranks" --grad-accum 1
python3 - "$work" "$OUT/losses.json" <<'PY'
import sys, json
from pathlib import Path
from safetensors.numpy import load_file
work, out = Path(sys.argv[1]), sys.argv[2]
loss = lambda run: [json.loads(l)["loss"] for l in (work / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
one, ranks = load_file(str(work / "one/lora.safetensors")), load_file(str(work / "ranks/lora.safetensors"))
diff = max(float(abs(one[k].astype("float32") - ranks[k].astype("float32")).max()) for k in one)
result = {"one_process_grad_accum_2": loss("one"), "two_ranks_one_gpu": loss("ranks"), "lora_max_abs_diff": diff}
json.dump(result, open(out, "w"), indent=1); print(json.dumps(result))
assert result["one_process_grad_accum_2"] == result["two_ranks_one_gpu"] and diff == 0.0, "2 NCCL ranks differ from --grad-accum 2"
print("PASS: 2 NCCL ranks on one GPU equal 1 rank with --grad-accum 2")
PY
for mib in 167 586; do
    torchrun --standalone --nproc-per-node 2 --no-python "${same_gpu[@]}" "${ort[@]}" allreduce-bench --mib "$mib" --repeat 10 --device cuda \
        | tee -a "$OUT/allreduce.jsonl"
done
