"""Export Wan's VAE decoder to ONNX inference graphs that `flowstep sample --vae-decoder` runs.

python -m flowstep_export.pipeline.vae_decoder --vae Wan2.1_VAE.pth --out DIR
python -m flowstep_export.pipeline.vae_decoder --vae Wan2.2_VAE.pth --out DIR   # TI2V-5B

DiffSynth decodes a latent video one latent frame at a time (`VideoVAE_.decode`): every causal
3-D convolution of `Decoder3d` keeps the last two frames of its input in a feature cache that the
next frame's call reads, so memory stays at one chunk (4 output frames) whatever the length. The
export keeps that structure, as a streaming pair of graphs over one latent frame each:

  vae_decoder_first.onnx  latent [1,z,1,h,w]                      -> frames [1,3,1,sh,sw], cache_out_*
  vae_decoder_step.onnx   latent [1,z,1,h,w], cache_* [1,C,2,H,W] -> frames [1,3,4,sh,sw], cache_out_*

z and s are 16 and 8 for the Wan2.1 VAE, 48 and 16 for the Wan2.2 VAE (whose `Decoder3d_38`
gives 12 channels at 8× that the graphs unpatchify to RGB at 16×, as `VideoVAE38_.decode`).

h and w are dynamic; the frame count is whatever number of step calls the caller makes (a video
of F latent frames gives 1 + 4(F-1) frames). The graphs run DiffSynth's own decoder's `forward`
with its cache list passed in as tensors. Two graphs, because the first latent frame is decoded
differently: DiffSynth's temporal upsampling ('Rep' cache) skips it, so it gives one frame, not
four. Every cache is exchanged as two frames; where DiffSynth keeps one frame (or 'Rep') the
missing frame is zeros, which is what its causal padding adds in that case, so the result is
the same. Both graphs read one shared weights file (external data). Output: RGB, unclamped:
the caller clamps to [-1, 1] as DiffSynth's `single_decode` does, after blending when it decodes
in spatial tiles (DiffSynth's `tiled_decode` blends first, then clamps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .. import OPSET
from ..deps import run_reporting_errors
from ..files import publish_files
from ..model.wan_vae import load_vae, vae_name

log = logging.getLogger("flowstep_export")

FIRST, STEP, WEIGHTS, MANIFEST = "vae_decoder_first.onnx", "vae_decoder_step.onnx", "vae_decoder.weights", "vae_decoder.json"
FORMAT = "flowstep.vae_decoder"
# Example latent size for tracing and the export's own check: small, and not square so that a
# swapped height/width cannot pass.
EXAMPLE_HW = (4, 6)
# Largest |ONNX - DiffSynth| accepted by the export's own check (float32; see tests).
CHECK_ATOL = 1e-4


class DecoderChunk(torch.nn.Module):
    """One latent frame through DiffSynth's `Decoder3d` (Wan2.1) or `Decoder3d_38` (Wan2.2), the
    feature cache as tensors."""

    def __init__(self, vae, first: bool):
        super().__init__()
        self.model = vae.model
        self.first = first
        self.register_buffer("mean", vae.scale[0].float().clone())
        self.register_buffer("inv_std", vae.scale[1].float().clone())
        from diffsynth.models.wan_video_vae import Decoder3d_38, Resample, count_conv3d

        self.wan22 = isinstance(self.model.decoder, Decoder3d_38)
        # DiffSynth sizes the cache list by counting every CausalConv3d, shortcuts included;
        # only the first `used` slots are ever filled (counted on the first call).
        self.slots = count_conv3d(self.model.decoder)
        self.num_caches = 0
        # The first call leaves 'Rep' in the temporal upsamplers' slots; the zeros that stand
        # for it need the shape of those upsamplers' inputs, recorded here.
        self.rep_inputs: list[torch.Tensor] = []
        if first:
            for m in self.model.decoder.modules():
                if isinstance(m, Resample) and m.mode == "upsample3d":
                    m.register_forward_pre_hook(lambda _m, args: self.rep_inputs.append(args[0]))

    def forward(self, latent, *caches):
        from diffsynth.models.wan_video_vae import unpatchify

        z_dim = self.mean.shape[0]
        # VideoVAE_.decode (and VideoVAE38_'s): z / scale[1] + scale[0], then conv2, then the
        # decoder per frame.
        z = latent / self.inv_std.view(1, z_dim, 1, 1, 1) + self.mean.view(1, z_dim, 1, 1, 1)
        x = self.model.conv2(z)
        self.rep_inputs.clear()
        feat_cache = [None] * self.slots if self.first else list(caches) + [None] * (self.slots - len(caches))
        if self.wan22:
            # VideoVAE38_.decode: the first chunk flagged (its shortcut drops the frames before
            # the first), the 12 output channels unpatchified to RGB at twice the size.
            out, feat_cache, used = self.model.decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=self.first)
            out = unpatchify(out, patch_size=2)
        else:
            out, feat_cache, used = self.model.decoder(x, feat_cache=feat_cache, feat_idx=[0])
        self.num_caches = used[0]
        rep = iter(self.rep_inputs)
        caches_out = []
        for c in feat_cache[:used[0]]:
            if isinstance(c, str):  # 'Rep': the next call pads with zeros
                inp = next(rep)
                c = torch.zeros_like(torch.cat([inp, inp], dim=2))
            elif c.shape[2] == 1:  # one frame kept: the missing one is the causal zero padding
                c = torch.cat([torch.zeros_like(c), c], dim=2)
            caches_out.append(c)
        return (out, *caches_out)


def _export(module: DecoderChunk, example: tuple, names_in: list[str], names_out: list[str]) -> onnx.ModelProto:
    h, w = torch.export.Dim("height", min=1, max=1024), torch.export.Dim("width", min=1, max=1024)
    latent = example[0]

    def scaled(size: int, base: int, dim):
        factor = size // base  # each cache is the latent's size times a power of two
        return dim if factor == 1 else factor * dim

    caches = tuple({3: scaled(c.shape[3], latent.shape[3], h), 4: scaled(c.shape[4], latent.shape[4], w)} for c in example[1:])
    program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET, optimize=True,
                                input_names=names_in, output_names=names_out,
                                dynamic_shapes=({3: h, 4: w}, caches) if caches else ({3: h, 4: w},), verbose=False)
    return program.model_proto


def _share_weights(models: list[onnx.ModelProto], out: Path) -> None:
    """Moves the large initializers of all models into one external-data file, stored once per
    name (the graphs hold the same decoder weights)."""
    offsets: dict[str, tuple[int, int, bytes]] = {}
    with open(out / WEIGHTS, "wb") as f:
        for model in models:
            for init in model.graph.initializer:
                data = numpy_helper.to_array(init).tobytes()
                if len(data) < 1024:
                    continue
                known = offsets.get(init.name)
                if known is None or known[2] != hashlib.sha256(data).digest():
                    offset = f.tell()
                    f.write(data)
                    f.write(b"\0" * (-f.tell() % 64))
                    known = offsets[init.name] = (offset, len(data), hashlib.sha256(data).digest())
                init.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data"):
                    init.ClearField(field)
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for key, value in (("location", WEIGHTS), ("offset", str(known[0])), ("length", str(known[1]))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value


def export_vae_decoder(vae_path: Path, out: Path) -> dict:
    """Writes the two graphs, their weights and vae_decoder.json to `out`; checks them against
    DiffSynth's decode on a random latent; returns the manifest. The files are written into a
    temporary folder in `out` and moved to their names once checked, the manifest last."""
    vae = load_vae(vae_path, f"--vae {vae_path}")
    return publish_files(out, (FIRST, STEP, WEIGHTS, MANIFEST), lambda temp: write_vae_decoder(vae, vae_path.name, temp))


def write_vae_decoder(vae, source: str, out: Path) -> dict:
    """Exports and checks the decoder of `vae` (loaded from the file named `source`) into `out`."""
    import onnxruntime as ort

    z_dim = vae.z_dim
    first, step = DecoderChunk(vae, first=True).eval(), DecoderChunk(vae, first=False).eval()
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, z_dim, 3, *EXAMPLE_HW, generator=generator)
    with torch.no_grad():
        first_out = first(latent[:, :, :1])
        caches = first_out[1:]
    n = first.num_caches
    cache_in, cache_out = [f"cache_{i}" for i in range(n)], [f"cache_out_{i}" for i in range(n)]
    with torch.no_grad():
        models = [_export(first, (latent[:, :, :1],), ["latent"], ["frames", *cache_out]),
                  _export(step, (latent[:, :, 1:2], *caches), ["latent", *cache_in], ["frames", *cache_out])]
    _share_weights(models, out)
    for model, name in zip(models, (FIRST, STEP)):
        onnx.save_model(model, str(out / name))
        onnx.checker.check_model(str(out / name))
    manifest = {
        "format": FORMAT, "version": 1, "source": source, "vae": vae_name(vae), "z_dim": z_dim, "dim": vae.model.decoder.dim,
        "upsampling": {"time": 4, "space": vae.upsampling_factor}, "caches": n,
        "graphs": {"first": FIRST, "step": STEP}, "weights": WEIGHTS,
        "output": {"layout": "[1, 3, T, H, W] RGB", "range": "unclamped; clamp to [-1, 1] after blending tiles"},
        "files": {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in (FIRST, STEP, WEIGHTS)},
    }
    # Export's own check: the streamed ONNX decode against DiffSynth's on the example latent.
    frames = decode_with_onnx(out, latent.numpy(), ort)
    with torch.no_grad():
        reference = vae.decode(latent, device="cpu").numpy()
    diff = float(np.abs(frames - reference).max())
    manifest["check"] = {"latent_shape": list(latent.shape), "max_abs_diff": diff}
    if not diff <= CHECK_ATOL:
        raise RuntimeError(f"exported VAE decoder differs from DiffSynth's decode by {diff:.3g} (> {CHECK_ATOL})")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def decode_with_onnx(out: Path, latent: np.ndarray, ort) -> np.ndarray:
    """[1, z, F, h, w] latents -> [1, 3, 1+4(F-1), sh, sw] frames in [-1, 1] through the two graphs."""
    first = ort.InferenceSession(str(out / FIRST), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(out / STEP), providers=["CPUExecutionProvider"])
    results = first.run(None, {"latent": latent[:, :, :1]})
    frames, caches = [results[0]], results[1:]
    for i in range(1, latent.shape[2]):
        feed = {"latent": latent[:, :, i:i + 1], **{f"cache_{j}": c for j, c in enumerate(caches)}}
        results = step.run(None, feed)
        frames.append(results[0])
        caches = results[1:]
    return np.clip(np.concatenate(frames, axis=2), -1, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.pipeline.vae_decoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, type=Path, help="Wan VAE checkpoint: Wan2.1_VAE.pth or Wan2.2_VAE.pth "
                   "(TI2V-5B), DiffSynth's `model.` keys, or ComfyUI's wan_2.1_vae.safetensors")
    p.add_argument("--out", required=True, type=Path, help="directory for the graphs (the DIR of flowstep sample --vae-decoder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    rc, manifest = run_reporting_errors("the VAE decoder export", lambda: export_vae_decoder(args.vae, args.out))
    if rc:
        return rc
    print(json.dumps({"out": str(args.out), "caches": manifest["caches"], "check": manifest["check"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
