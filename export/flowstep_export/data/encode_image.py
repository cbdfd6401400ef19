"""Encode a start image into the condition file `flowstep sample --condition` reads for an
image-to-video model (and `condition=` in a --sample-prompts file).

python -m flowstep_export.data.encode_image --image start.png --model wan2.1-i2v-14b \\
    --vae Wan2.1_VAE.pth --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth \\
    --resolution 480x832 --frames 81 --out start.safetensors

The image is cropped to the resolution as prepare crops a clip's input image, and encoded as
prepare encodes it for a clip of that many frames: `y` [20, (frames-1)/4+1, H/8, W/8] and, for
Wan2.1, `clip_feature` [257, 1280] (float32). Sample with `--shape (frames-1)/4+1,H/8,W/8`.
With --last-image (FLF2V) `y` ends with that image, as prepare --last-frame makes it from a clip.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deps import run_reporting_errors
from ..files import require_regular_file, save_tensors
from .prepare import MULTIPLE, PRECISIONS, image_conditioning


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.data.encode_image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, type=Path, help="the start image (png, jpg, webp, bmp)")
    p.add_argument("--last-image", type=Path, help="FLF2V: the end image, the video's last frame in `y` "
                   "(DiffSynth's end_image); the CLIP features stay the start image's")
    p.add_argument("--out", required=True, type=Path, help="condition file to write (.safetensors)")
    p.add_argument("--model", required=True, metavar="PRESET", help="the image-to-video DiT: wan2.1-i2v-14b, wan2.2-i2v-a14b")
    p.add_argument("--vae", required=True, type=Path, help="Wan2.1 VAE: Wan2.1_VAE.pth or wan_2.1_vae.safetensors")
    p.add_argument("--clip", type=Path, help="Wan2.1 I2V's image encoder (needed by --model wan2.1-i2v-14b)")
    p.add_argument("--resolution", required=True, metavar="HxW", help="video size HEIGHTxWIDTH, multiples of 16")
    p.add_argument("--frames", required=True, metavar="N", help="video frames, 4k+1 (e.g. 81)")
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16",
                   help="encoders' compute precision (default bfloat16, as DiffSynth)")
    p.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda (default cpu)")
    args = p.parse_args(argv)
    rc, _ = run_reporting_errors("encode_image", lambda: encode(args))
    return rc


def encode(args) -> None:
    from .media import parse_frames, parse_resolutions, read_image

    buckets, frame_counts = parse_resolutions([args.resolution], MULTIPLE), parse_frames([args.frames])
    if len(buckets) != 1 or len(frame_counts) != 1:
        raise ValueError(f"--resolution {args.resolution} --frames {args.frames}: give one size and one frame count")
    bucket, frames = buckets[0], frame_counts[0]
    conditioning = image_conditioning(args.model, args.clip)
    if not conditioning:
        raise ValueError(f"--model {args.model}: a text-to-video model takes no image")
    require_regular_file(args.vae, f"--vae {args.vae}")
    require_regular_file(args.image, f"--image {args.image}")
    if args.last_image is not None:
        if frames == 1:
            raise ValueError(f"--last-image {args.last_image}: FLF2V needs a first and a last frame; give --frames 5 or more")
        require_regular_file(args.last_image, f"--last-image {args.last_image}")
    pixels = read_image(args.image, bucket)
    end_pixels = None if args.last_image is None else read_image(args.last_image, bucket)

    import torch

    from ..model.wan_vae import load_vae
    from .image_conditioning import encode_clip, encode_y

    compute = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    image = torch.from_numpy(pixels).to(compute)
    vae = load_vae(args.vae, f"--vae {args.vae}")
    vae.model.to(device=args.device, dtype=compute)
    end_image = None if end_pixels is None else torch.from_numpy(end_pixels).to(compute)
    tensors = {"y": encode_y(vae, image, frames, args.device, end_image)}
    if "clip_feature" in conditioning:
        from ..model.wan_clip import load_image_encoder

        encoder = load_image_encoder(args.clip, compute, f"--clip {args.clip}").to(args.device)
        tensors["clip_feature"] = encode_clip(encoder, image, args.device)
    tensors = {name: t.to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    if (bad := [name for name, t in tensors.items() if not torch.isfinite(t).all()]):
        raise ValueError(f"{args.image}: the encoders gave NaN or Inf values in {', '.join(bad)}; nothing written")
    save_tensors(tensors, args.out, metadata={"image": str(args.image), "last_image": str(args.last_image or "none"),
                                              "model": args.model, "bucket": str(bucket), "frames": str(frames)})
    latent = tensors["y"].shape[1:]
    print(f"{args.out}: {', '.join(tensors)} for --shape {','.join(map(str, latent))}")


if __name__ == "__main__":
    sys.exit(main())
