"""Turn a folder of captioned videos and images into a flowstep dataset.

python -m flowstep_export.prepare --videos DIR --out DATA --vae Wan2.1_VAE.pth \\
    --text-encoder models_t5_umt5-xxl-enc-bf16.pth --tokenizer google/umt5-xxl \\
    --resolution 480x832 --frames 81 [--fps 16]

Captions come from DIR/metadata.csv (DiffSynth's layout: a `video` or `image` column with paths
relative to DIR, and a `prompt` column) or, without it, from a `.txt` beside each file
(`clip.mp4` + `clip.txt`). Each file becomes DATA/<relative path>.safetensors with

  latents  [16, (T-1)/4+1, H/8, W/8]  Wan VAE latents (DiffSynth's normalised `input_latents`)
  context  [text_len, 4096]           umT5 embeddings, zero after the prompt's tokens

stored as bf16 (or float32 with --dtype f32); T, H, W are the file's frame and resolution
bucket. A file already in DATA is skipped, so an interrupted run continues where it stopped; a
file that cannot be used gets one line, is skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .deps import run_reporting_errors

MULTIPLE = 16  # VAE /8 times the DiT's patch 2
PRECISIONS = ("bfloat16", "float32")


@dataclass
class Item:
    source: Path
    caption: str | None
    name: str  # output file stem, from the path relative to --videos


def output_name(rel: Path) -> str:
    """`a/b.mp4` -> `a__b.mp4` (an absolute path in metadata.csv loses its root)."""
    return "__".join(part for part in rel.parts if part != rel.anchor)


def find_items(root: Path) -> list[Item]:
    """Files and captions, from metadata.csv or sidecar .txt files."""
    from .media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    if not root.is_dir():
        raise ValueError(f"--videos {root}: not a directory")
    metadata = root / "metadata.csv"
    if metadata.is_file():
        with open(metadata, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{metadata}: no rows")
        column = next((c for c in ("video", "image") if c in rows[0]), None)
        if column is None or "prompt" not in rows[0]:
            raise ValueError(f"{metadata}: needs a `video` (or `image`) column and a `prompt` column; has {list(rows[0])}")
        return [Item(root / row[column], row["prompt"], output_name(Path(row[column]))) for row in rows]
    media = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
    if not media:
        raise ValueError(f"--videos {root}: no videos ({', '.join(VIDEO_SUFFIXES)}) or images, and no metadata.csv")
    items = []
    for path in media:
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        items.append(Item(path, caption, output_name(path.relative_to(root))))
    return items


class Progress:
    """One self-rewriting line on a terminal; a line per file otherwise."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.start = total, quiet, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, label: str) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        width = 30
        bar = "#" * (width * done // max(self.total, 1))
        line = f"[{bar:<{width}}] {done}/{self.total} {elapsed:5.0f}s {label}"
        print(("\r" + line[:120].ljust(120)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        print(("\r" if self.tty else "") + text.ljust(120 if self.tty else 0), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flowstep_export.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, type=Path, help="folder of videos/images with captions (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (flowstep train --data)")
    p.add_argument("--vae", required=True, type=Path, help="Wan2.1 VAE: Wan2.1_VAE.pth or wan_2.1_vae.safetensors")
    p.add_argument("--text-encoder", required=True, type=Path, help="umT5 encoder: models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (Wan's google/umt5-xxl)")
    p.add_argument("--resolution", action="append", required=True, metavar="HxW",
                   help="resolution bucket HEIGHTxWIDTH, multiples of 16; repeat or comma-separate for several "
                        "(each file goes to the one nearest its aspect ratio)")
    p.add_argument("--frames", action="append", required=True, metavar="N",
                   help="frame bucket, 4k+1 (e.g. 81); repeat or comma-separate for several (each video gets the "
                        "longest it can fill; images are 1 frame)")
    p.add_argument("--fps", type=float, help="resample videos to this frame rate first (Wan2.1: 16); default: "
                   "consecutive source frames")
    p.add_argument("--text-len", type=int, default=512, help="prompt tokens (default 512, Wan's; the DiT's text_len)")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="stored precision (default bf16)")
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16",
                   help="encoders' compute precision (default bfloat16, as DiffSynth; the CPU is faster in float32)")
    p.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict[str, int]:
    import torch
    from safetensors.torch import save_file

    from .media import parse_frames, parse_resolutions, read_clip
    from .wan_text import encode_prompt, load_text_encoder, load_tokenizer
    from .wan_vae import load_vae

    buckets = parse_resolutions(args.resolution, MULTIPLE)
    frame_buckets = parse_frames(args.frames)
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps}: must be positive")
    if args.text_len < 1:
        raise ValueError(f"--text-len {args.text_len}: must be at least 1")
    items = find_items(args.videos)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not (args.out / f"{it.name}.safetensors").exists()]
    counts = {"files": len(items), "done_before": len(items) - len(todo), "prepared": 0, "skipped": 0}
    if not todo:
        return counts
    compute = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    stored = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokenizer = load_tokenizer(args.tokenizer, args.text_len)
    encoder = load_text_encoder(args.text_encoder, compute).to(args.device)
    vae = load_vae(args.vae)
    vae.model.to(device=args.device, dtype=compute)
    progress = Progress(len(todo), args.quiet)
    for i, item in enumerate(todo):
        progress.update(i, item.source.name)
        try:
            if item.caption is None:
                raise ValueError(f"no caption: write {item.source.with_suffix('.txt').name} beside it, or list it in metadata.csv")
            if not item.source.is_file():
                raise ValueError("no such file")
            clip = read_clip(item.source, buckets, frame_buckets, args.fps)
        except ValueError as e:
            progress.message(f"skipped {item.source}: {e}")
            counts["skipped"] += 1
            continue
        with torch.no_grad():
            pixels = torch.from_numpy(clip.pixels).to(compute)
            latents = vae.encode([pixels], device=args.device)[0]
            context = encode_prompt(tokenizer, encoder, item.caption, args.device)
        sample = {"latents": latents.to("cpu", stored).contiguous(), "context": context.to("cpu", stored).contiguous()}
        metadata = {"source": str(item.source.relative_to(args.videos) if item.source.is_relative_to(args.videos) else item.source),
                    "caption": item.caption, "bucket": str(clip.bucket), "frames": str(clip.pixels.shape[1]),
                    "fps": "source" if args.fps is None else f"{args.fps:g}", "vae": args.vae.name,
                    "text_encoder": args.text_encoder.name}
        final = args.out / f"{item.name}.safetensors"
        temp = final.with_name(f".{final.name}.tmp")
        save_file(sample, str(temp), metadata=metadata)
        os.replace(temp, final)  # a half-written sample never carries the final name
        counts["prepared"] += 1
    progress.update(len(todo), "done")
    progress.close()
    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    rc, counts = run_reporting_errors("prepare", lambda: prepare(args))
    if rc:
        return rc
    print(f"{counts['prepared']} prepared, {counts['done_before']} already in {args.out}, {counts['skipped']} skipped "
          f"(of {counts['files']} files)")
    return 0 if counts["prepared"] + counts["done_before"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
