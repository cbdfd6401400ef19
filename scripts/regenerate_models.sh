#!/usr/bin/env bash
# Re-exports the committed artifacts after a change to the exporter, with the exact options
# the tests expect, and rewrites the PyTorch goldens:
#   models/tiny/artifacts     tiny preset, LoRA rank 8, attention chunk 12 (the Rust tests' 32 tokens
#                             run as 3 chunks of 11, one padded row), base weights shipped
#   models/tiny/golden.safetensors
#   models/tiny-fused/artifacts  the same with --attention fused (com.flowstep operators), so
#                             the Rust tests compare fused and chunked training
#   tests/golden/flash_attention_bf16.onnx  both com.flowstep operators, bf16 and f32
#   tests/golden/flash_attention_pair_{bf16,fp16}.onnx  the operator pair at Wan's scale, any shape
#                             (GPU parity test, tests/cuda_attention_parity.rs)
#   models/toy/artifacts      toy preset from its own pretrained base, LoRA rank 16
#   models/tiny-ti2v/artifacts   Wan2.2 TI2V at the tiny width (48 channels, first-frame
#                             conditioning), rank 8, chunk 12, base shipped
#   models/tiny-a14b/{high_noise,low_noise}/artifacts  the Wan2.2 T2V-A14B expert pair at the
#                             tiny width, one export per expert (seeds 1 and 2: own base weights)
#   models/toy-i2v/           the demo's image-to-video toy: the toy's base with `y` columns,
#                             its clips and prompt, LoRA rank 16 (flowstep_export.data.toy_i2v)
# export/tests/test_committed_artifacts.py fails when a fresh export differs from these files.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$root"
venv="$(scripts/setup_python.sh)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cd export
"$venv/bin/python" -m flowstep_export --model tiny --out "$tmp/tiny" --lora-rank 8 --attention-chunk 12 --ship-base -q >/dev/null
rm -rf ../models/tiny/artifacts && mv "$tmp/tiny" ../models/tiny/artifacts
"$venv/bin/python" -m flowstep_export --model tiny --out "$tmp/tiny-fused" --lora-rank 8 --attention fused --ship-base -q >/dev/null
rm -rf ../models/tiny-fused/artifacts && mkdir -p ../models/tiny-fused && mv "$tmp/tiny-fused" ../models/tiny-fused/artifacts
"$venv/bin/python" -c "import onnx, sys; from flowstep_export.reference.reference_ops import operator_test_model; onnx.save(operator_test_model(), sys.argv[1])" ../tests/golden/flash_attention_bf16.onnx
"$venv/bin/python" - <<'PY'
import onnx
from onnx import TensorProto
from flowstep_export.reference.reference_ops import pair_model
for name, elem in (("bf16", TensorProto.BFLOAT16), ("fp16", TensorProto.FLOAT16)):
    onnx.save(pair_model(elem, 128 ** -0.5), f"../tests/golden/flash_attention_pair_{name}.onnx")
PY
"$venv/bin/python" -m flowstep_export.reference.goldens --artifacts ../models/tiny/artifacts --out ../models/tiny/golden.safetensors
"$venv/bin/python" -m flowstep_export --model tiny-ti2v --out "$tmp/tiny-ti2v" --lora-rank 8 --attention-chunk 12 --ship-base -q >/dev/null
rm -rf ../models/tiny-ti2v/artifacts && mkdir -p ../models/tiny-ti2v && mv "$tmp/tiny-ti2v" ../models/tiny-ti2v/artifacts
for expert in high_noise:1 low_noise:2; do
    role="${expert%%:*}"
    "$venv/bin/python" -m flowstep_export --model tiny-a14b --expert "$role" --seed "${expert##*:}" --out "$tmp/$role" \
        --lora-rank 8 --attention-chunk 12 --ship-base -q >/dev/null
    rm -rf "../models/tiny-a14b/$role/artifacts" && mkdir -p "../models/tiny-a14b/$role" && mv "$tmp/$role" "../models/tiny-a14b/$role/artifacts"
done
# The toy base is recorded in the manifest by the path it was exported from.
mkdir -p /tmp/toy2 && cp ../models/toy/artifacts/base.safetensors /tmp/toy2/base.safetensors
"$venv/bin/python" -m flowstep_export --model toy --base /tmp/toy2/base.safetensors --lora-rank 16 --attention chunked --ship-base \
    --out "$tmp/toy" -q >/dev/null
rm -rf ../models/toy/artifacts && mv "$tmp/toy" ../models/toy/artifacts
# Built from the toy's base above; its manifest records the base by this fixed path.
rm -rf /tmp/toy-i2v && "$venv/bin/python" -m flowstep_export.data.toy_i2v --toy-base ../models/toy/artifacts/base.safetensors \
    --out /tmp/toy-i2v >/dev/null
rm -rf ../models/toy-i2v && mv /tmp/toy-i2v ../models/toy-i2v
git -C "$root" status --short models/
