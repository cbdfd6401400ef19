"""manifest.json: everything the Rust executor needs, validated on load (docs/DESIGN.md §3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import onnxruntime
import torch

from .. import FORMAT_VERSION, OPSET, __version__
from ..model.configs import WanConfig
from ..model.lora import LoraConfig

DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
          onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64"}


TORCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def value_info(values) -> list[dict]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        out.append({"name": v.name, "dtype": DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": shape})
    return out


def graph_signature(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    return {"file": path.name, "inputs": value_info(model.graph.input), "outputs": value_info(model.graph.output)}


def write_manifest(out: Path, config: WanConfig, lora: LoraConfig, layout, base: dict[str, torch.Tensor],
                   base_file: str | None, graphs: list[str], expert: dict | None = None, extra: dict | None = None,
                   training: dict | None = None) -> dict:
    files = [f"{g}.onnx" for g in graphs] + ["lora_init.safetensors"] + ([base_file] if base_file else [])
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": config.to_manifest(),
        "lora": {
            "rank": lora.rank, "alpha": lora.alpha_value, "targets": list(lora.targets), "init": lora.init,
            "num_params": sum(t.numel for t in layout),
            "tensors": [{"key": t.key, "shape": list(t.shape), "offset": t.offset} for t in layout],
        },
        "scheduler": {"template": "Wan", "num_train_timesteps": 1000, "shift": 5.0},
        "base_weights": {"file": base_file, "tensors": [{"name": k, "shape": list(v.shape), "dtype": TORCH_DTYPES[v.dtype]}
                                                        for k, v in base.items()]},
        "training": training or {},
        "graphs": {g: graph_signature(out / f"{g}.onnx") for g in graphs},
        "files": {f: sha256(out / f) for f in files},
        "exporter": {"opset": OPSET, "flowstep_export": __version__, "torch": torch.__version__.split("+")[0],
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    if expert:  # absent: a single model, not one expert of a Wan2.2 A14B pair
        manifest["expert"] = expert
    if extra:
        manifest["export"] = extra
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
