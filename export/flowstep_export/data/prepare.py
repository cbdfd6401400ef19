"""Turn a folder of captioned videos and images into a flowstep dataset.

python -m flowstep_export.data.prepare --videos DIR --out DATA --vae Wan2.1_VAE.pth \\
    --text-encoder models_t5_umt5-xxl-enc-bf16.pth --tokenizer google/umt5-xxl \\
    --resolution 480x832 --frames 81 [--fps 16]

Captions come from DIR/metadata.csv (DiffSynth's layout: a `video` or `image` column with paths
relative to DIR, and a `prompt` column) or, without it, from a `.txt` beside each file
(`clip.mp4` + `clip.txt`). Each file becomes DATA/<relative path>.safetensors with

  latents  [16, (T-1)/4+1, H/8, W/8]  Wan VAE latents (DiffSynth's normalised `input_latents`)
  context  [text_len, 4096]           umT5 embeddings, zero after the prompt's tokens

With the Wan2.2 VAE (`Wan2.2_VAE.pth`, for Wan2.2 TI2V-5B) the latents are [48, (T-1)/4+1,
H/16, W/16], H and W multiples of 32, and each sample also holds TI2V's first-frame condition

  first_frame_latents  [48, 1, H/16, W/16]  the clip's first frame alone through the VAE

as DiffSynth's training computes it (its `input_image` is the video's frame 0, encoded by
`WanVideoUnit_ImageEmbedderFused`). TI2V trains on the frames after the first, so a file that
gives one frame (an image, or a video in the 1-frame bucket) is skipped.

stored as bf16 (or float32 with --dtype f32); T, H, W are the file's frame and resolution
bucket. Each sample's metadata records the settings it was made with (resolution and frame
buckets, fps, text length, dtype, sha256 of the VAE, text encoder and tokenizer files). A file
already in DATA with the same settings is skipped, so an interrupted run continues where it
stopped; one made with other settings, or with none recorded (an older prepare), is re-encoded
in place. A file that cannot be used gets one line, is skipped and counted.

Only files under DIR are read: a metadata.csv path that leaves DIR stops the run, and a link in
DIR to a file outside it gets a warning naming the target. Captions and metadata.csv are UTF-8
(a BOM is dropped); any other encoding is an error naming the file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..deps import run_reporting_errors
from ..files import (file_problem, read_text, require_regular_file, save_tensors, sha256_of_file,
                    warn_if_outside)

DIT_PATCH = 2  # the DiT's spatial patch: the resolution is a multiple of the VAE's factor times this
LEAST_VAE_FACTOR = 8  # Wan2.1's; checked before the VAE is read
PRECISIONS = ("bfloat16", "float32")
FPS_RANGE = (0.01, 1000.0)
MAX_TEXT_LEN = 4096  # Wan's is 512
# Metadata keys of the settings a sample was made with, and the flag that sets each.
SETTING_FLAGS = {"resolutions": "--resolution", "frame_buckets": "--frames", "fps": "--fps", "text_len": "--text-len",
                 "dtype": "--dtype", "vae_sha256": "--vae", "text_encoder_sha256": "--text-encoder",
                 "tokenizer_sha256": "--tokenizer"}
NO_SETTINGS = "with no recorded settings"


@dataclass
class Item:
    source: Path
    caption: str | None
    name: str  # output file stem, from the path relative to --videos


def escape_part(part: str) -> str:
    """A path part with `%` and the underscores that could be confused with the separator `__`
    (runs of two or more, and any at the part's start or end) percent-encoded."""
    part = part.replace("%", "%25")
    out = []
    for i, c in enumerate(part):
        lone = 0 < i < len(part) - 1 and part[i - 1] != "_" and part[i + 1] != "_"
        out.append(c if c != "_" or lone else "%5F")
    return "".join(out)


def output_name(rel: Path) -> str:
    """`a/b.mp4` -> `a__b.mp4`; injective (`a__b.mp4` -> `a%5F%5Fb.mp4`) and never hidden
    (`.x.mp4` -> `%2Ex.mp4`)."""
    name = "__".join(escape_part(part) for part in rel.parts)
    return "%2E" + name[1:] if name.startswith(".") else name


def inside(root: Path, value: str, label: str) -> Path:
    """`value` (a metadata.csv path) relative to `root`, normalised; ValueError when it leaves root."""
    base = Path(os.path.abspath(root))
    path = Path(os.path.normpath(os.path.join(base, value)))
    if not value or path == base or not path.is_relative_to(base):
        raise ValueError(f"{label}: `{value}` is outside --videos {root}; metadata.csv paths are files under it")
    return path.relative_to(base)


def read_metadata(metadata: Path, root: Path) -> list[Item]:
    """DiffSynth's metadata.csv: a `video` (or `image`) column of paths under `root`, and `prompt`."""
    text = read_text(metadata)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise ValueError(f"{metadata}: line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError(f"{metadata}: no rows")
    column = next((c for c in ("video", "image") if c in rows[0]), None)
    if column is None or "prompt" not in rows[0]:
        raise ValueError(f"{metadata}: needs a `video` (or `image`) column and a `prompt` column; has {list(rows[0])}")
    items, rows_of = [], {}
    for number, row in enumerate(rows, start=1):
        label = f"{metadata}, row {number}"
        if row[column] is None or row["prompt"] is None:
            raise ValueError(f"{label}: fewer fields than the header")
        rel = inside(root, row[column], label)
        if rel in rows_of:
            raise ValueError(f"{metadata}: rows {rows_of[rel]} and {number} both name {rel}; one sample per file")
        rows_of[rel] = number
        source = root / rel
        if os.path.lexists(source):
            warn_if_outside(source, root, f"{label} ({rel})")
        items.append(Item(source, row["prompt"], output_name(rel)))
    return items


def find_items(root: Path) -> list[Item]:
    """Files and captions, from metadata.csv or sidecar .txt files."""
    from .media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    if not root.is_dir():
        raise ValueError(f"--videos {root}: not a directory")
    metadata = root / "metadata.csv"
    if os.path.lexists(metadata):
        return read_metadata(metadata, root)
    media = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES and not p.is_dir())
    if not media:
        raise ValueError(f"--videos {root}: no videos ({', '.join(VIDEO_SUFFIXES)}) or images, and no metadata.csv")
    items = []
    for path in media:
        warn_if_outside(path, root, str(path))
        txt = path.with_suffix(".txt")
        caption = None
        if os.path.lexists(txt):
            warn_if_outside(txt, root, str(txt))
            caption = read_text(txt).strip()
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
    p = argparse.ArgumentParser(prog="python -m flowstep_export.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, type=Path, help="folder of videos/images with captions (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (flowstep train --data)")
    p.add_argument("--vae", required=True, type=Path, help="Wan VAE: Wan2.1_VAE.pth or wan_2.1_vae.safetensors (Wan2.1, "
                   "Wan2.2 A14B), or Wan2.2_VAE.pth (Wan2.2 TI2V-5B: also writes first_frame_latents)")
    p.add_argument("--text-encoder", required=True, type=Path, help="umT5 encoder: models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (Wan's google/umt5-xxl)")
    p.add_argument("--resolution", action="append", required=True, metavar="HxW",
                   help="resolution bucket HEIGHTxWIDTH, multiples of 16 (32 with the Wan2.2 VAE); repeat or comma-separate for several "
                        "(each file goes to the one nearest its aspect ratio)")
    p.add_argument("--frames", action="append", required=True, metavar="N",
                   help="frame bucket, 4k+1 (e.g. 81); repeat or comma-separate for several (each video gets the "
                        "longest it can fill; images are 1 frame)")
    p.add_argument("--fps", type=float, help="resample videos to this frame rate first (Wan2.1: 16); default: "
                   f"consecutive source frames; from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
    p.add_argument("--text-len", type=int, default=512,
                   help=f"prompt tokens (default 512, Wan's; the DiT's text_len; at most {MAX_TEXT_LEN})")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="stored precision (default bf16)")
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16",
                   help="encoders' compute precision (default bfloat16, as DiffSynth; the CPU is faster in float32)")
    p.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_text_len(text_len: int) -> None:
    if not 1 <= text_len <= MAX_TEXT_LEN:
        raise ValueError(f"--text-len {text_len}: must be from 1 to {MAX_TEXT_LEN}")


def tokenizer_sha256(folder: Path) -> str:
    """sha256 of the folder's `sha256sum`-style listing (`<sha256>  <name>` per file, by name)."""
    files = sorted(p for p in folder.iterdir() if not p.is_dir())
    return hashlib.sha256("".join(f"{sha256_of_file(p)}  {p.name}\n" for p in files).encode()).hexdigest()


def why_re_encode(path: Path, settings: dict[str, str]) -> str | None:
    """Why the existing sample `path` must be made again with `settings`, or None to keep it."""
    from safetensors import safe_open

    if (problem := file_problem(path)) is not None:  # a FIFO would hang the read, a directory the write
        raise ValueError(f"{path}: {problem}; move it out of --out")
    try:
        with safe_open(str(path), "pt") as f:
            recorded = f.metadata() or {}
    except Exception:  # safetensors raises its own SafetensorError, and OSError
        return "unreadable"
    if not all(key in recorded for key in settings):
        return NO_SETTINGS
    changed = [flag for key, flag in SETTING_FLAGS.items() if recorded[key] != settings[key]]
    return f"made with another {' and '.join(changed)}" if changed else None


def prepare(args: argparse.Namespace) -> dict:
    from .media import parse_frames, parse_resolutions, read_clip

    # Every option before any work.
    parse_resolutions(args.resolution, LEAST_VAE_FACTOR * DIT_PATCH)
    frame_buckets = parse_frames(args.frames)
    if args.fps is not None and not (math.isfinite(args.fps) and FPS_RANGE[0] <= args.fps <= FPS_RANGE[1]):
        raise ValueError(f"--fps {args.fps:g}: must be from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
    check_text_len(args.text_len)
    require_regular_file(args.vae, f"--vae {args.vae}")
    require_regular_file(args.text_encoder, f"--text-encoder {args.text_encoder}")

    import torch

    from ..model.wan_text import encode_prompt, load_text_encoder, load_tokenizer
    from ..model.wan_vae import WAN22_Z_DIM, load_vae

    tokenizer = load_tokenizer(args.tokenizer, args.text_len)
    items = find_items(args.videos)
    vae = load_vae(args.vae, f"--vae {args.vae}")
    buckets = parse_resolutions(args.resolution, vae.upsampling_factor * DIT_PATCH)
    # The Wan2.2 VAE is TI2V-5B's: its samples carry the first frame's latents.
    first_frame = vae.z_dim == WAN22_Z_DIM
    if first_frame and max(frame_buckets) == 1:
        raise ValueError(f"--frames {','.join(map(str, frame_buckets))}: TI2V (the Wan2.2 VAE) trains on the frames "
                         "after the first; give a bucket of 5 frames or more")
    settings = {"resolutions": ",".join(map(str, buckets)), "frame_buckets": ",".join(map(str, frame_buckets)),
                "fps": "source" if args.fps is None else f"{args.fps:g}", "text_len": str(args.text_len),
                "dtype": args.dtype, "vae_sha256": sha256_of_file(args.vae),
                "text_encoder_sha256": sha256_of_file(args.text_encoder), "tokenizer_sha256": tokenizer_sha256(args.tokenizer)}
    args.out.mkdir(parents=True, exist_ok=True)
    stale = {}  # item name -> why its existing sample is made again
    todo = []
    for item in items:
        path = args.out / f"{item.name}.safetensors"
        if not path.exists():
            todo.append(item)
        elif (why := why_re_encode(path, settings)) is not None:
            stale[item.name] = why
            todo.append(item)
    counts = {"files": len(items), "done_before": len(items) - len(todo), "prepared": 0, "skipped": 0,
              "re_encoded": Counter()}
    if not todo:
        return counts
    if (older := sum(why == NO_SETTINGS for why in stale.values())):
        print(f"samples in {args.out} with no recorded settings (made by an older prepare): {older}, re-encoding them",
              file=sys.stderr)
    compute = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    stored = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    encoder = load_text_encoder(args.text_encoder, compute, f"--text-encoder {args.text_encoder}").to(args.device)
    vae.model.to(device=args.device, dtype=compute)
    progress = Progress(len(todo), args.quiet)

    def drop_stale(item: Item) -> str:
        """Removes the sample `item` had from other settings (kept, it would mix them into the
        dataset); the clause that says so, or ""."""
        if item.name not in stale:
            return ""
        (args.out / f"{item.name}.safetensors").unlink()
        return f"; its old sample ({stale[item.name]}) removed"

    for i, item in enumerate(todo):
        progress.update(i, item.source.name)
        try:
            if item.caption is None:
                raise ValueError(f"no caption: write {item.source.with_suffix('.txt').name} beside it, or list it in metadata.csv")
            if (problem := file_problem(item.source)) is not None:
                raise ValueError(problem)
            clip = read_clip(item.source, buckets, frame_buckets, args.fps)
            if first_frame and clip.pixels.shape[1] == 1:
                raise ValueError("one frame: TI2V (the Wan2.2 VAE) trains on the frames after the first; it needs a video "
                                 f"of {min(f for f in frame_buckets if f > 1)} frames or more")
        except ValueError as e:
            progress.message(f"skipped {item.source}: {e}{drop_stale(item)}")
            counts["skipped"] += 1
            continue
        with torch.no_grad():
            pixels = torch.from_numpy(clip.pixels).to(compute)
            tensors = {"latents": vae.encode([pixels], device=args.device)[0],
                       "context": encode_prompt(tokenizer, encoder, item.caption, args.device)}
            if first_frame:  # DiffSynth's WanVideoUnit_ImageEmbedderFused on frame 0
                tensors["first_frame_latents"] = vae.encode([pixels[:, :1]], device=args.device)[0]
        sample = {name: t.to("cpu", stored).contiguous() for name, t in tensors.items()}
        nonfinite = [name for name, t in sample.items() if not torch.isfinite(t).all()]
        if nonfinite:
            encoders = {"latents": f"the VAE ({args.vae.name})", "first_frame_latents": f"the VAE ({args.vae.name})",
                        "context": f"the text encoder ({args.text_encoder.name})"}
            progress.message(f"skipped {item.source}: {' and '.join(dict.fromkeys(encoders[n] for n in nonfinite))} gave NaN or Inf "
                             f"values; nothing written{drop_stale(item)}")
            counts["skipped"] += 1
            continue
        metadata = {"source": str(item.source.relative_to(args.videos)), "caption": item.caption,
                    "bucket": str(clip.bucket), "frames": str(clip.pixels.shape[1]),
                    "vae": args.vae.name, "text_encoder": args.text_encoder.name} | settings
        save_tensors(sample, args.out / f"{item.name}.safetensors", metadata)
        counts["prepared"] += 1
        if item.name in stale:
            counts["re_encoded"][stale[item.name]] += 1
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
    re_encoded = counts["re_encoded"]
    why = (f" ({re_encoded.total()} re-encoded: {'; '.join(f'{n} {reason}' for reason, n in re_encoded.most_common())})"
           if re_encoded else "")
    print(f"{counts['prepared']} prepared{why}, {counts['done_before']} already in {args.out}, {counts['skipped']} "
          f"skipped (of {counts['files']} files)")
    return 0 if counts["prepared"] + counts["done_before"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
