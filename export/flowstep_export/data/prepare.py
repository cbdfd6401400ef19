"""Turn a folder of captioned videos and images into a flowstep dataset.

python -m flowstep_export.data.prepare --videos DIR --out DATA --vae Wan2.1_VAE.pth \\
    --text-encoder models_t5_umt5-xxl-enc-bf16.pth --tokenizer google/umt5-xxl \\
    --resolution 480x832 --frames 81 [--fps 16] \\
    [--model wan2.1-i2v-14b --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth]

Captions come from DIR/metadata.csv (DiffSynth's layout: a `video` or `image` column with paths
relative to DIR, and a `prompt` column) or, without it, from a `.txt` beside each file
(`clip.mp4` + `clip.txt`). Each file becomes DATA/<relative path>.safetensors with

  latents  [16, (T-1)/4+1, H/8, W/8]  Wan VAE latents (DiffSynth's normalised `input_latents`)
  context  [text_len, 4096]           umT5 embeddings, zero after the prompt's tokens

and, for an image-to-video --model (wan2.1-i2v-14b, wan2.2-i2v-a14b), the conditioning its DiT
takes, from the clip's first frame as DiffSynth's trainer (`--extra_inputs input_image`) does:

  y             [20, (T-1)/4+1, H/8, W/8]  a first-frame mask (4 channels) and the VAE latents
                                           of the first frame followed by black frames
  clip_feature  [257, 1280]                CLIP ViT-H image tokens (Wan2.1 only; --clip)

An image beside a video with the same name (clip.mp4 + clip.png), or a metadata.csv
`input_image` column, gives that video's input image instead of its first frame; it is cropped
to the video's bucket.
With --last-frame (FLF2V, DiffSynth's `end_image`, which its trainer takes from the clip's last
frame) the black frames end with the clip's last frame and the mask is 1 on it too.

With the Wan2.2 VAE (`Wan2.2_VAE.pth`, for Wan2.2 TI2V-5B; no --model) the latents are [48,
(T-1)/4+1, H/16, W/16], H and W multiples of 32, and each sample also holds TI2V's first-frame
condition

  first_frame_latents  [48, 1, H/16, W/16]  the clip's first frame alone through the VAE

as DiffSynth's training computes it (its `input_image` is the video's frame 0, encoded by
`WanVideoUnit_ImageEmbedderFused`). TI2V trains on the frames after the first, so a file that
gives one frame (an image, or a video in the 1-frame bucket) is skipped.

All are stored as bf16 (or float32 with --dtype f32); T, H, W are the file's frame and resolution
bucket. Each sample's metadata records the settings it was made with (resolution and frame
buckets, fps, text length, dtype, sha256 of the VAE, text encoder and tokenizer files, the
conditioning and the CLIP file's sha256) and, for I2V, where its input image came from
(`input_image`). A file already in DATA with the same settings is skipped, so an interrupted run
continues where it stopped; one made with other settings, or with none recorded (an older
prepare), is re-encoded in place. A file that cannot be used gets one line, is skipped and counted.

`--config dataset.toml` replaces --videos/--resolution/--frames/--fps with a dataset config in
musubi-tuner's format (dataset_config.py): several folders, each with its resolution, caption
extension, repeats and frame extraction; a video then gives a sample per clip,
DATA/<dataset>__<relative path>__<first frame>-<frames>.safetensors.

Only files under DIR are read: a metadata.csv path that leaves DIR stops the run, and a link in
DIR to a file outside it gets a warning naming the target. Captions and metadata.csv are UTF-8
(a BOM is dropped); any other encoding is an error naming the file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..deps import run_reporting_errors
from .dataset_config import FPS_RANGE, MULTIPLE
from ..files import (file_problem, read_text, require_regular_file, save_tensors, sha256_of_file,
                    warn_if_outside)

DIT_PATCH = 2  # the DiT's spatial patch: the resolution is a multiple of the VAE's factor times this
PRECISIONS = ("bfloat16", "float32")
MAX_TEXT_LEN = 4096  # Wan's is 512
# Metadata keys of the settings a sample was made with, and the flag that sets each.
SETTING_FLAGS = {"resolutions": "--resolution", "frame_buckets": "--frames", "fps": "--fps", "text_len": "--text-len",
                 "dtype": "--dtype", "vae_sha256": "--vae", "text_encoder_sha256": "--text-encoder",
                 "tokenizer_sha256": "--tokenizer", "frame_extraction": "frame_extraction",
                 "conditioning": "--model", "image_encoder_sha256": "--clip", "end_image": "--last-frame"}
# What samples made before prepare wrote image conditioning were: text-to-video, no CLIP, no end image.
TEXT_ONLY = {"conditioning": "none", "image_encoder_sha256": "none", "end_image": "none"}
NO_SETTINGS = "with no recorded settings"
FIRST_FRAME = "first frame"
IMAGE_COLUMN = "input_image"  # DiffSynth's name for the I2V image


@dataclass
class Item:
    source: Path
    caption: str | None
    name: str  # output file stem, from the path relative to --videos
    image: Path | None = None  # the clip's input image for I2V; None: its first frame

    def image_label(self, root: Path) -> str:
        """Where the I2V input image comes from, as recorded in the sample."""
        return FIRST_FRAME if self.image is None else str(self.image.relative_to(root))


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
        if row[column] is None or row["prompt"] is None or row.get(IMAGE_COLUMN, "") is None:
            raise ValueError(f"{label}: fewer fields than the header")
        rel = inside(root, row[column], label)
        image = root / inside(root, row[IMAGE_COLUMN], f"{label}, {IMAGE_COLUMN}") if row.get(IMAGE_COLUMN) else None
        if rel in rows_of:
            raise ValueError(f"{metadata}: rows {rows_of[rel]} and {number} both name {rel}; one sample per file")
        rows_of[rel] = number
        source = root / rel
        if os.path.lexists(source):
            warn_if_outside(source, root, f"{label} ({rel})")
        items.append(Item(source, row["prompt"], output_name(rel), image))
    return items


def find_items(root: Path, caption_extension: str = ".txt", input_images: bool = False) -> list[Item]:
    """Files and captions, from metadata.csv or sidecar caption files (`.txt` by default); with
    `input_images`, an image beside a video with its name is the video's input image, not a
    sample of its own."""
    from .media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    if not root.is_dir():
        raise ValueError(f"--videos {root}: not a directory")
    metadata = root / "metadata.csv"
    if os.path.lexists(metadata):
        return read_metadata(metadata, root)
    media = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES and not p.is_dir())
    if not media:
        raise ValueError(f"--videos {root}: no videos ({', '.join(VIDEO_SUFFIXES)}) or images, and no metadata.csv")
    images_of = {}  # video -> the image beside it
    if input_images:
        videos = {p.with_suffix(""): p for p in media if p.suffix.lower() in VIDEO_SUFFIXES}
        for image in (p for p in media if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix("") in videos):
            video = videos[image.with_suffix("")]
            if video in images_of:
                raise ValueError(f"{video}: two images beside it ({images_of[video].name}, {image.name}); keep one as its input image")
            images_of[video] = image
        media = [p for p in media if p not in images_of.values()]
    items = []
    for path in media:
        warn_if_outside(path, root, str(path))
        txt = path.with_suffix(caption_extension)
        caption = None
        if os.path.lexists(txt):
            warn_if_outside(txt, root, str(txt))
            caption = read_text(txt).strip()
        if (image := images_of.get(path)) is not None:
            warn_if_outside(image, root, str(image))
        items.append(Item(path, caption, output_name(path.relative_to(root)), image))
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
    p.add_argument("--videos", type=Path, help="folder of videos/images with captions (searched recursively)")
    p.add_argument("--config", type=Path, metavar="TOML",
                   help="dataset config in musubi-tuner's format instead of --videos/--resolution/--frames/--fps: several "
                        "folders, each with its resolution, caption_extension, num_repeats and frame_extraction "
                        "(head, chunk, slide, uniform, full); see flowstep_export/data/dataset_config.py")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (flowstep train --data)")
    p.add_argument("--vae", required=True, type=Path, help="Wan VAE: Wan2.1_VAE.pth or wan_2.1_vae.safetensors (Wan2.1, "
                   "Wan2.2 A14B), or Wan2.2_VAE.pth (Wan2.2 TI2V-5B: also writes first_frame_latents)")
    p.add_argument("--text-encoder", required=True, type=Path, help="umT5 encoder: models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (Wan's google/umt5-xxl)")
    p.add_argument("--resolution", action="append", metavar="HxW",
                   help="resolution bucket HEIGHTxWIDTH, multiples of 16 (32 with the Wan2.2 VAE); repeat or comma-separate for several "
                        "(each file goes to the one nearest its aspect ratio)")
    p.add_argument("--frames", action="append", metavar="N",
                   help="frame bucket, 4k+1 (e.g. 81); repeat or comma-separate for several (each video gets the "
                        "longest it can fill; images are 1 frame)")
    p.add_argument("--fps", type=float, help="resample videos to this frame rate first (Wan2.1: 16); default: "
                   f"consecutive source frames; from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
    p.add_argument("--model", default=None, metavar="PRESET",
                   help="the DiT the dataset is for (a flowstep_export --model preset): for an image-to-video one "
                        "(wan2.1-i2v-14b, wan2.2-i2v-a14b) each sample also gets `y` and, for Wan2.1, `clip_feature`; "
                        "default: text-to-video (latents and context)")
    p.add_argument("--clip", type=Path, help="Wan2.1 I2V's image encoder, models_clip_open-clip-xlm-roberta-large-"
                   "vit-huge-14.pth (needed by --model wan2.1-i2v-14b)")
    p.add_argument("--last-frame", action="store_true",
                   help="FLF2V (first and last frame), with an image-to-video --model: `y` also holds the clip's last frame, "
                        "as DiffSynth's end_image (its trainer's `--extra_inputs input_image,end_image`); clips of one "
                        "frame are skipped")
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


def why_re_encode(path: Path, settings: dict[str, str], input_image: str | None) -> str | None:
    """Why the existing sample `path` must be made again with `settings` (and, for I2V, from
    `input_image`), or None to keep it."""
    from safetensors import safe_open

    if (problem := file_problem(path)) is not None:  # a FIFO would hang the read, a directory the write
        raise ValueError(f"{path}: {problem}; move it out of --out")
    try:
        with safe_open(str(path), "pt") as f:
            recorded = f.metadata() or {}
    except Exception:  # safetensors raises its own SafetensorError, and OSError
        return "unreadable"
    recorded = TEXT_ONLY | recorded
    if not all(key in recorded for key in settings):
        return NO_SETTINGS
    changed = [SETTING_FLAGS[key] for key in settings if recorded[key] != settings[key]]
    if not changed and input_image is not None and recorded.get("input_image") != input_image:
        changed.append("input image")
    return f"made with another {' and '.join(changed)}" if changed else None


def dataset_specs(args: argparse.Namespace) -> list:
    """The folders to prepare: the config file's datasets, or the one the flags describe."""
    from .dataset_config import DatasetSpec, check_fps, read_config
    from .media import FrameExtraction, parse_frames, parse_resolutions

    flags = {"--videos": args.videos, "--resolution": args.resolution, "--frames": args.frames, "--fps": args.fps}
    if args.config is not None:
        if given := [flag for flag, value in flags.items() if value is not None]:
            raise ValueError(f"--config {args.config}: {given[0]} is set per dataset in the config file; give one or the other")
        return read_config(args.config)
    if missing := [flag for flag, value in flags.items() if value is None and flag != "--fps"]:
        raise ValueError(f"{missing[0]} is required (or --config FILE, a dataset config)")
    return [DatasetSpec(args.videos, None, parse_resolutions(args.resolution, MULTIPLE),
                        FrameExtraction("longest", tuple(parse_frames(args.frames))), check_fps(args.fps, "--fps"))]


def sample_name(base: str, spec, clip, video: bool) -> str:
    """A config dataset's video gives clips `BASE__START-FRAMES` (as musubi's `_START-FRAMES`);
    `__` followed by no file suffix cannot be a path part, so the names stay injective."""
    return f"{base}__{clip.start:05d}-{clip.pixels.shape[1]:03d}" if spec.name is not None and video else base


def link_repeats(out: Path, name: str, repeats: int) -> list[str]:
    """`NAME__repeat-K` hard links (K = 2..repeats) to the sample `name`: musubi's num_repeats,
    each sample that many times in the dataset, with no copies on disk."""
    names = []
    for k in range(2, repeats + 1):
        link = f"{name}__repeat-{k}"
        tmp = out / f".{link}.tmp-{os.getpid()}"
        os.link(out / f"{name}.safetensors", tmp)
        os.replace(tmp, out / f"{link}.safetensors")
        names.append(link)
    return names


def image_conditioning(model: str | None, clip: Path | None, text_len: int | None = None) -> list[str]:
    """The conditioning tensors the DiT `model` (--model) takes, none for text-to-video; --clip
    and, when given, --text-len checked against it."""
    from ..model.configs import get_config

    if model is None:
        names = []
    else:
        config = get_config(model)
        if config.variant == "ti2v":
            raise ValueError(f"--model {model}: TI2V takes no --model; its first_frame_latents come from the Wan2.2 VAE "
                             "(--vae Wan2.2_VAE.pth)")
        names = [name for name, _ in config.conditioning]
        if text_len is not None and text_len != config.text_len:
            raise ValueError(f"--text-len {text_len}: --model {model} takes {config.text_len} prompt tokens")
    if "clip_feature" in names and clip is None:
        raise ValueError(f"--model {model} takes CLIP image features: give --clip "
                         "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    if clip is not None:
        if "clip_feature" not in names:
            raise ValueError(f"--clip {clip}: {'text-to-video (no --model)' if model is None else f'--model {model}'} "
                             "takes no CLIP image features")
        require_regular_file(clip, f"--clip {clip}")
    return names


def prepare(args: argparse.Namespace) -> dict:
    from .media import VIDEO_SUFFIXES, parse_resolutions, read_clips, read_image

    # Every option before any work.
    specs = dataset_specs(args)
    check_text_len(args.text_len)
    require_regular_file(args.vae, f"--vae {args.vae}")
    require_regular_file(args.text_encoder, f"--text-encoder {args.text_encoder}")
    conditioning = image_conditioning(args.model, args.clip, args.text_len)
    if args.last_frame and not conditioning:
        raise ValueError("--last-frame: FLF2V needs an image-to-video --model (wan2.1-i2v-14b, wan2.2-i2v-a14b)")

    import torch

    from ..model.wan_text import encode_prompt, load_text_encoder, load_tokenizer
    from ..model.wan_vae import WAN22_Z_DIM, load_vae
    from .image_conditioning import encode_clip, encode_y

    tokenizer = load_tokenizer(args.tokenizer, args.text_len)
    shared = {"text_len": str(args.text_len), "dtype": args.dtype, "vae_sha256": sha256_of_file(args.vae),
              "text_encoder_sha256": sha256_of_file(args.text_encoder), "tokenizer_sha256": tokenizer_sha256(args.tokenizer),
              "conditioning": ",".join(conditioning) or "none",
              "image_encoder_sha256": "none" if args.clip is None else sha256_of_file(args.clip),
              "end_image": "last frame" if args.last_frame else "none"}
    jobs = []  # (spec, item, the sample name base, settings)
    for spec in specs:
        settings = {"resolutions": ",".join(map(str, spec.buckets)), "frame_buckets": ",".join(map(str, spec.extraction.target_frames)),
                    "fps": "source" if spec.fps is None else f"{spec.fps:g}"} | shared
        if spec.name is not None:
            settings["frame_extraction"] = spec.extraction.describe()
        prefix = "" if spec.name is None else output_name(Path(spec.name)) + "__"
        jobs += [(spec, item, prefix + item.name, settings)
                 for item in find_items(spec.folder, spec.caption_extension, input_images=bool(conditioning))]
    if not conditioning and (given := sum(item.image is not None for _, item, _, _ in jobs)):
        print(f"warning: metadata.csv gives {given} files an {IMAGE_COLUMN}; text-to-video samples take none "
              "(--model an I2V preset uses them)", file=sys.stderr)
    vae = load_vae(args.vae, f"--vae {args.vae}")
    # The Wan2.2 VAE is TI2V-5B's: its samples carry the first frame's latents.
    ti2v = vae.z_dim == WAN22_Z_DIM
    if ti2v and conditioning:
        raise ValueError(f"--vae {args.vae}: the Wan2.2 VAE is TI2V-5B's; --model {args.model}'s y holds the Wan2.1 VAE's "
                         "latents (Wan2.1_VAE.pth)")
    for spec in specs:  # the stride this VAE needs (32 for Wan2.2's), with parse_resolutions' message
        parse_resolutions([f"{b.height}x{b.width}" for b in spec.buckets], vae.upsampling_factor * DIT_PATCH)
    for spec in specs:
        if ti2v and max(spec.extraction.target_frames) == 1:
            raise ValueError(f"--frames {','.join(map(str, spec.extraction.target_frames))}: TI2V (the Wan2.2 VAE) trains on the "
                             "frames after the first; give a bucket of 5 frames or more")

    def input_image(spec, item: Item) -> str | None:
        """Where an I2V sample's input image comes from (recorded as `input_image`); None for T2V."""
        return item.image_label(spec.folder) if conditioning else None

    args.out.mkdir(parents=True, exist_ok=True)
    existing = {p.name.removesuffix(".safetensors") for p in args.out.glob("*.safetensors")}
    stale = {}  # sample name -> why its existing sample is made again
    todo = []
    for spec, item, base, settings in jobs:
        # Flags: one sample per file, known by name before decoding. Config: clips, known after.
        if spec.name is None and base in existing:
            if (why := why_re_encode(args.out / f"{base}.safetensors", settings, input_image(spec, item))) is None:
                continue
            stale[base] = why
        todo.append((spec, item, base, settings))
    counts = {"files": len(jobs), "done_before": len(jobs) - len(todo), "prepared": 0, "skipped": 0, "re_encoded": Counter()}
    if not todo:
        return counts
    compute = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    stored = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    encoders = {}

    def encode(pixels, caption, input_pixels):
        if not encoders:  # loaded once something needs encoding
            encoders["text"] = load_text_encoder(args.text_encoder, compute, f"--text-encoder {args.text_encoder}").to(args.device)
            vae.model.to(device=args.device, dtype=compute)
            if "clip_feature" in conditioning:
                from ..model.wan_clip import load_image_encoder

                encoders["image"] = load_image_encoder(args.clip, compute, f"--clip {args.clip}").to(args.device)
        with torch.no_grad():
            pixels = torch.from_numpy(pixels).to(compute)
            tensors = {"latents": vae.encode([pixels], device=args.device)[0],
                       "context": encode_prompt(tokenizer, encoders["text"], caption, args.device)}
            if ti2v:  # DiffSynth's WanVideoUnit_ImageEmbedderFused on frame 0
                tensors["first_frame_latents"] = vae.encode([pixels[:, :1]], device=args.device)[0]
            if conditioning:  # DiffSynth's WanVideoUnit_ImageEmbedderVAE / _ImageEmbedderCLIP
                input_pixels = torch.from_numpy(input_pixels).to(compute)
                end_image = pixels[:, -1] if args.last_frame else None
                tensors["y"] = encode_y(vae, input_pixels, pixels.shape[1], args.device, end_image)
            if "clip_feature" in conditioning:
                tensors["clip_feature"] = encode_clip(encoders["image"], input_pixels, args.device)
        return {name: t.to("cpu", stored).contiguous() for name, t in tensors.items()}

    def drop_old(base: str, keep: set[str]) -> str:
        """Removes the samples of a file that it no longer makes (kept, they would mix other settings
        or clips into the dataset); the clause that says so, or ""."""
        old = [n for n in existing if (n == base or n.startswith(base + "__")) and n not in keep]
        for name in old:
            (args.out / f"{name}.safetensors").unlink(missing_ok=True)
        if old == [base] and base in stale:
            return f"; its old sample ({stale[base]}) removed"
        return f"; its {len(old)} old sample{'s' * (len(old) != 1)} removed" if old else ""

    progress = Progress(len(todo), args.quiet)
    older = 0
    for i, (spec, item, base, settings) in enumerate(todo):
        progress.update(i, item.source.name)
        video = item.source.suffix.lower() in VIDEO_SUFFIXES
        kept = set()
        try:
            if item.caption is None:
                raise ValueError(f"no caption: write {item.source.with_suffix(spec.caption_extension).name} beside it, or list it in metadata.csv")
            if (problem := file_problem(item.source)) is not None:
                raise ValueError(problem)
            given_image = None  # the input image, read once per bucket
            for clip in read_clips(item.source, spec.buckets, spec.extraction, spec.fps):
                if ti2v and clip.pixels.shape[1] == 1:
                    raise ValueError("one frame: TI2V (the Wan2.2 VAE) trains on the frames after the first; it needs a video "
                                     f"of {min(f for f in spec.extraction.target_frames if f > 1)} frames or more")
                if args.last_frame and clip.pixels.shape[1] == 1:
                    raise ValueError("one frame: --last-frame (FLF2V) needs a first and a last frame")
                if item.image is not None and conditioning:
                    if given_image is None or given_image[0] != clip.bucket:
                        if (problem := file_problem(item.image)) is not None:
                            raise ValueError(f"input image {item.image}: {problem}")
                        given_image = (clip.bucket, read_image(item.image, clip.bucket))
                    input_pixels = given_image[1]
                else:
                    input_pixels = clip.pixels[:, 0]
                name = sample_name(base, spec, clip, video)
                why = (why_re_encode(args.out / f"{name}.safetensors", settings, input_image(spec, item))
                       if name in existing else "new")
                if why is None:
                    counts["done_before"] += 1
                else:
                    sample = encode(clip.pixels, item.caption, input_pixels)
                    if nonfinite := [n for n, t in sample.items() if not torch.isfinite(t).all()]:
                        encoder = {"latents": f"the VAE ({args.vae.name})", "first_frame_latents": f"the VAE ({args.vae.name})",
                                   "y": f"the VAE ({args.vae.name})", "context": f"the text encoder ({args.text_encoder.name})",
                                   "clip_feature": f"the image encoder ({Path(args.clip or '').name})"}
                        raise ValueError(f"{' and '.join(dict.fromkeys(encoder[n] for n in nonfinite))} gave NaN or Inf values; nothing written")
                    metadata = {"source": str(item.source.relative_to(spec.folder)), "caption": item.caption,
                                "bucket": str(clip.bucket), "frames": str(clip.pixels.shape[1]), "first_frame": str(clip.start),
                                "vae": args.vae.name, "text_encoder": args.text_encoder.name} | settings
                    if conditioning:  # `first_frame` is the clip's start in the video; this, its I2V image
                        metadata["input_image"] = input_image(spec, item)
                    save_tensors(sample, args.out / f"{name}.safetensors", metadata)
                    counts["prepared"] += 1
                    if why != "new":
                        counts["re_encoded"][why] += 1
                        older += why == NO_SETTINGS
                kept |= {name, *link_repeats(args.out, name, spec.repeats)}
        except ValueError as e:
            progress.message(f"skipped {item.source}: {e}{drop_old(base, kept)}")
            counts["skipped"] += 1
            continue
        drop_old(base, kept)
    progress.update(len(todo), "done")
    progress.close()
    if older:
        print(f"samples in {args.out} with no recorded settings (made by an older prepare): {older}, re-encoded",
              file=sys.stderr)
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
