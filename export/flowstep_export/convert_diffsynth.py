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

python -m flowstep_export.convert_diffsynth CACHE_DIR OUT_DIR [--dtype bf16|f32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .deps import missing_module

LATENT_KEYS = ("input_latents",)
CONTEXT_KEYS = ("context", "prompt_emb")
# name -> dims without the batch axis
CONDITIONING = {"y": 4, "clip_feature": 2, "first_frame_latents": 4}
BOUNDARY_KEYS = ("min_timestep_boundary", "max_timestep_boundary")
BOUNDARIES_FILE = "diffsynth_boundaries.json"


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
        if isinstance(v, torch.Tensor):
            v = v.item()
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{path}: `{key}` is {v!r}; expected a fraction in [0, 1]")
        values.append(float(v))
    return values[0], values[1]


def available_keys(obj) -> list[str]:
    if isinstance(obj, dict):
        return sorted(obj)
    if isinstance(obj, (tuple, list)):
        return [k for item in obj for k in available_keys(item)]
    return []


def convert_sample(path: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """The sample's tensors in flowstep's names and shapes, and its timestep boundaries."""
    # DiffSynth pickles whole dicts (not only tensors), so weights_only cannot be used:
    # convert only caches you made yourself.
    data = torch.load(path, map_location="cpu", weights_only=False)
    latents, context = find(data, LATENT_KEYS), find(data, CONTEXT_KEYS)
    if latents is None or context is None:
        missing = "input_latents" if latents is None else "context"
        raise ValueError(f"{path}: no `{missing}` tensor; keys found: {available_keys(data)}")
    if latents.dim() == 5:
        if latents.shape[0] != 1:
            raise ValueError(f"{path}: input_latents has batch {latents.shape[0]}; flowstep samples hold one video")
        latents = latents[0]
    if context.dim() == 3:
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
        out[name] = t.to(dtype).contiguous()
    for name, t in out.items():
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{path}: `{name}` has NaN or Inf values")
    return out, boundaries(path, data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.convert_diffsynth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="DiffSynth data_process output (searched recursively for *.pth)")
    p.add_argument("out", type=Path, help="flowstep dataset directory to write")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="stored precision (default bf16, as cached)")
    args = p.parse_args(argv)
    files = sorted(args.cache.rglob("*.pth"))
    if not files:
        print(f"error: no .pth files under {args.cache}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        stored = {}
        for i, path in enumerate(files):
            sample, bounds = convert_sample(path, dtype)
            stored.setdefault(bounds, path)
            if len(stored) > 1:
                (a, first), (b, _) = stored.items()
                raise ValueError(f"{path}: timestep boundaries {list(b)} differ from {list(a)} in {first}; "
                                 "convert the caches of each run separately")
            rel = path.relative_to(args.cache).with_suffix("")
            save_file(sample, str(args.out / f"{i:06d}-{'_'.join(rel.parts)}.safetensors"))
        (bounds,) = stored
        if bounds != (0.0, 1.0):
            (args.out / BOUNDARIES_FILE).write_text(json.dumps(dict(zip(BOUNDARY_KEYS, bounds))) + "\n")
        else:
            (args.out / BOUNDARIES_FILE).unlink(missing_ok=True)  # from an earlier conversion into OUT
    except ModuleNotFoundError as e:
        # DiffSynth's cache pickles PIL images and other objects: unpickling imports their modules.
        print(missing_module(e, f"reading the DiffSynth cache ({path})"), file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kept = sorted(set(sample) - {"latents", "context"})
    print(f"converted {len(files)} samples to {args.out}" + (f" with {', '.join(kept)}" if kept else "")
          + (f"; DiffSynth's timestep boundaries {list(bounds)} in {BOUNDARIES_FILE}" if bounds != (0.0, 1.0) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
