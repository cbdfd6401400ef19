"""Convert DiffSynth-Studio's cached training samples to flowstep's dataset format.

DiffSynth's `--task sft:data_process` (`runner.launch_data_process_task`) writes one `.pth`
per sample: the pipeline inputs after the text encoder and VAE ran, a tuple
`(inputs_shared, inputs_posi, inputs_nega)` of dicts, with the VAE latents in
`inputs_shared["input_latents"]` ([1, 16, F, H, W]) and the umT5 embeddings in
`inputs_posi["context"]` ([1, 512, 4096]). flowstep reads one `.safetensors` per sample
with `latents` [C, F, H, W] and `context` [L, D].

Image-to-video caches (`--extra_inputs input_image`) also hold the conditioning, which is
kept under the same names without the batch axis: `y` [C_y, F, H, W] (Wan2.1 I2V,
Wan2.2 I2V-A14B: mask + image latents), `clip_feature` [257, 1280] (Wan2.1 I2V) and
`first_frame_latents` [C, 1, H, W] (Wan2.2 TI2V). DiffSynth stores the timestep boundaries
of the run that made the cache (`min/max_timestep_boundary`) in every sample and trains
with them; when they are not the full range [0, 1] they are written to
OUT/diffsynth_boundaries.json, which `flowstep train` reads (samples that disagree are an
error).

The cache files are pickles, and a pickle can run any command when it is loaded: they are read
with torch's `weights_only` unpickler, which builds only tensors and plain values. The PIL
frames DiffSynth stores beside the tensors load as inert stand-ins (never decoded); a file that
needs anything else is refused. The samples appear in OUT only when every one converted.

python -m flowstep_export.data.convert_diffsynth CACHE_DIR OUT_DIR [--dtype bf16|f32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..deps import run_reporting_errors
from ..files import check_tensor_storage, load_torch_file, require_regular_file, save_tensors, warn_if_outside, write_text

LATENT_KEYS = ("input_latents",)
CONTEXT_KEYS = ("context", "prompt_emb")
# name -> dims without the batch axis
CONDITIONING = {"y": 4, "clip_feature": 2, "first_frame_latents": 4}
BOUNDARY_KEYS = ("min_timestep_boundary", "max_timestep_boundary")
BOUNDARIES_FILE = "diffsynth_boundaries.json"


class SkippedImage:
    """Stands in for the PIL images (`input_video` frames, `input_image`) in DiffSynth's cache:
    flowstep never uses them, and decoding a stranger's image state could allocate any size."""

    def __setstate__(self, state) -> None:
        pass


STAND_INS = ((SkippedImage, "PIL.Image.Image"),)


def find(obj, keys):
    """The first tensor under one of `keys` in a dict, or in a tuple/list of dicts."""
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), torch.Tensor):
                return obj[k]
        return None
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = find(item, keys)
            if found is not None:
                return found
    return None


def find_value(obj, key):
    """The first non-tensor value under `key` in a dict, or in a tuple/list of dicts."""
    if isinstance(obj, dict):
        return obj.get(key)
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = find_value(item, key)
            if found is not None:
                return found
    return None


def boundaries(path: Path, data) -> tuple[float, float]:
    """The (min, max) timestep boundaries a DiffSynth cache sample holds; (0, 1) when absent."""
    values = []
    for key, default in zip(BOUNDARY_KEYS, (0.0, 1.0)):
        v = find_value(data, key)
        if v is None:
            v = default
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{path}: `{key}` is {v!r}; expected a fraction in [0, 1]")
        values.append(float(v))
    if not values[0] < values[1]:
        raise ValueError(f"{path}: min_timestep_boundary {values[0]:g} is not below max_timestep_boundary {values[1]:g}; "
                         "such a cache trains on no timestep")
    return values[0], values[1]


def available_keys(obj) -> list[str]:
    if isinstance(obj, dict):
        return sorted(obj)
    if isinstance(obj, (tuple, list)):
        return [k for item in obj for k in available_keys(item)]
    return []


def convert_sample(path: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """The sample's tensors in flowstep's names and shapes, and its timestep boundaries."""
    data = load_torch_file(path, STAND_INS)
    latents, context = find(data, LATENT_KEYS), find(data, CONTEXT_KEYS)
    if latents is None or context is None:
        missing = "input_latents" if latents is None else "context"
        raise ValueError(f"{path}: no `{missing}` tensor; keys found: {available_keys(data)}")
    check_tensor_storage(path, "input_latents", latents)
    check_tensor_storage(path, "context", context)
    if latents.dim() == 5:
        if latents.shape[0] != 1:
            raise ValueError(f"{path}: input_latents has batch {latents.shape[0]}; flowstep samples hold one video")
        latents = latents[0]
    if context.dim() == 3:
        if context.shape[0] != 1:
            raise ValueError(f"{path}: context has batch {context.shape[0]}; flowstep samples hold one prompt")
        context = context[0]
    if latents.dim() != 4 or context.dim() != 2:
        raise ValueError(f"{path}: expected latents [C,F,H,W] and context [L,D], got {list(latents.shape)} and {list(context.shape)}")
    out = {"latents": latents.to(dtype).contiguous(), "context": context.to(dtype).contiguous()}
    for name, dims in CONDITIONING.items():
        t = find(data, (name,))
        if t is None:
            continue
        if t.dim() == dims + 1:
            if t.shape[0] != 1:
                raise ValueError(f"{path}: {name} has batch {t.shape[0]}; flowstep samples hold one video")
            t = t[0]
        if t.dim() != dims:
            raise ValueError(f"{path}: expected {name} with {dims} dims (no batch axis), got {list(t.shape)}")
        check_tensor_storage(path, name, t)
        out[name] = t.to(dtype).contiguous()
    for name, t in out.items():
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{path}: `{name}` has NaN or Inf values")
    return out, boundaries(path, data)


def convert(cache: Path, out: Path, dtype: torch.dtype) -> tuple[int, list[str], tuple[float, float]]:
    """Converts every sample of `cache` into `out`: returns (samples, conditioning kept, boundaries).
    The samples are written into a temporary folder in `out` and moved to their final names only
    once all converted, so a failure leaves no partial dataset."""
    if not cache.is_dir():
        raise ValueError(f"{cache}: not a directory")
    files = sorted(cache.rglob("*.pth"))
    if not files:
        raise ValueError(f"no .pth files under {cache}")
    for path in files:
        require_regular_file(path)
        warn_if_outside(path, cache, str(path))
    out.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".convert_diffsynth-", dir=out))
    try:
        stored, names = {}, []
        for i, path in enumerate(files):
            sample, bounds = convert_sample(path, dtype)
            stored.setdefault(bounds, path)
            if len(stored) > 1:
                (a, first), (b, _) = stored.items()
                raise ValueError(f"{path}: timestep boundaries {list(b)} differ from {list(a)} in {first}; "
                                 "convert the caches of each run separately")
            rel = path.relative_to(cache).with_suffix("")
            names.append(f"{i:06d}-{'_'.join(rel.parts)}.safetensors")
            save_tensors(sample, temp / names[-1])
        (bounds,) = stored
        (out / BOUNDARIES_FILE).unlink(missing_ok=True)  # from an earlier conversion into OUT
        for name in names:
            os.replace(temp / name, out / name)
        if bounds != (0.0, 1.0):
            write_text(out / BOUNDARIES_FILE, json.dumps(dict(zip(BOUNDARY_KEYS, bounds))) + "\n")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return len(files), sorted(set(sample) - {"latents", "context"}), bounds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.data.convert_diffsynth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="DiffSynth data_process output (searched recursively for *.pth)")
    p.add_argument("out", type=Path, help="flowstep dataset directory to write")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="stored precision (default bf16, as cached)")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rc, result = run_reporting_errors("convert_diffsynth", lambda: convert(args.cache, args.out, dtype))
    if rc:
        return rc
    count, kept, bounds = result
    print(f"converted {count} samples to {args.out}" + (f" with {', '.join(kept)}" if kept else "")
          + (f"; DiffSynth's timestep boundaries {list(bounds)} in {BOUNDARIES_FILE}" if bounds != (0.0, 1.0) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
