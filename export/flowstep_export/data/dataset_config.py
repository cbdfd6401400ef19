"""`prepare --config FILE`: several folders in one dataset, in musubi-tuner's dataset config format.

    [general]                      # keys for every dataset below (each may override them)
    resolution = [832, 480]        # musubi's [WIDTH, HEIGHT], or flowstep's "480x832,832x480"
    caption_extension = ".txt"
    num_repeats = 1
    fps = 16                       # resample videos to this rate first (flowstep's --fps)

    [[datasets]]
    video_directory = "clips/fox"  # or image_directory; relative to this file
    num_repeats = 2                # each sample twice (hard links), to balance datasets
    target_frames = [1, 25, 45]    # 4k+1 each
    frame_extraction = "slide"     # head (default), chunk, slide, uniform, full
    frame_stride = 10              # slide
    frame_sample = 4               # uniform
    max_frames = 81                # full (required)
    name = "fox"                   # prefix of the sample names; default: the folder's name

`frame_extraction` and its keys, `video_directory`, `image_directory` and `name` belong to a
`[[datasets]]` entry, as in musubi. musubi's batch_size, enable_bucket, bucket_no_upscale and
cache_directory are ignored with a warning (flowstep trains one sample per step, its buckets are
the resolutions given, the samples go to --out); any other key is an error naming it.
"""

from __future__ import annotations

import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..files import read_text
from .media import EXTRACTIONS, Bucket, FrameExtraction, parse_frames, parse_resolutions

MULTIPLE = 16  # VAE /8 times the DiT's patch 2
FPS_RANGE = (0.01, 1000.0)
MAX_CONFIG_BYTES = 1 << 20
MAX_REPEATS = 1000
COMMON = {"resolution", "caption_extension", "num_repeats", "fps"}
PER_DATASET = {"video_directory", "image_directory", "name", "target_frames", "frame_extraction", "frame_stride",
               "frame_sample", "max_frames"}
IGNORED = {"batch_size", "enable_bucket", "bucket_no_upscale", "cache_directory"}


@dataclass(frozen=True)
class DatasetSpec:
    """One folder of captioned videos/images and how it becomes samples."""

    folder: Path
    name: str | None  # prefix of its sample names; None: prepare's flags, names as before
    buckets: list[Bucket]
    extraction: FrameExtraction
    fps: float | None
    caption_extension: str = ".txt"
    repeats: int = 1


def check_fps(fps: float | None, label: str) -> float | None:
    if fps is not None and not (math.isfinite(fps) and FPS_RANGE[0] <= fps <= FPS_RANGE[1]):
        raise ValueError(f"{label} {fps:g}: must be from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}")
    return fps


def read_config(path: Path) -> list[DatasetSpec]:
    """The datasets of a config file; ValueError (one line naming the file and key) when it is wrong."""
    try:
        config = tomllib.loads(read_text(path, f"--config {path}", MAX_CONFIG_BYTES))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not TOML: {e}") from None
    unknown = set(config) - {"general", "datasets"}
    if unknown:
        raise ValueError(f"--config {path}: unknown section {sorted(unknown)[0]!r} (general, datasets)")
    general = config.get("general", {})
    entries = config.get("datasets")
    if not isinstance(general, dict) or not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"--config {path}: needs [[datasets]] entries (and optionally a [general] table)")
    specs = []
    for number, entry in enumerate(entries, start=1):
        label = f"--config {path}, dataset {number}"
        for key in general:
            if key in PER_DATASET:
                raise ValueError(f"--config {path}: [general] {key}: belongs to each [[datasets]] entry, as in musubi-tuner")
        for table, keys in (("[general]", general), (f"dataset {number}", entry)):
            for key in keys:
                if key in IGNORED:
                    print(f"warning: --config {path}, {table}: {key} is ignored by flowstep", file=sys.stderr)
                elif key not in COMMON | PER_DATASET:
                    raise ValueError(f"--config {path}, {table}: unknown key {key!r}")
        specs.append(dataset(general | entry, path.parent, label))
    names = [s.name for s in specs]
    for s in specs:
        if names.count(s.name) > 1:
            raise ValueError(f"--config {path}: two datasets are named {s.name!r}; give one a `name`")
    return specs


def dataset(values: dict, base: Path, label: str) -> DatasetSpec:
    def get(key, kind, default=None):
        value = values.get(key, default)
        if value is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
            raise ValueError(f"{label}: {key} = {value!r}: expected {getattr(kind, '__name__', 'a number')}")
        return value

    def positive(key, default=None):
        value = get(key, int, default)
        if value is not None and value < 1:
            raise ValueError(f"{label}: {key} = {value}: must be at least 1")
        return value

    folders = [k for k in ("video_directory", "image_directory") if k in values]
    if len(folders) != 1:
        raise ValueError(f"{label}: give one of video_directory and image_directory")
    folder = base / get(folders[0], str)
    resolution = values.get("resolution")
    if isinstance(resolution, list) and len(resolution) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in resolution):
        text = f"{resolution[1]}x{resolution[0]}"  # musubi's [width, height]
    elif isinstance(resolution, str):
        text = resolution
    else:
        raise ValueError(f"{label}: resolution = {resolution!r}: expected [WIDTH, HEIGHT] as musubi, or \"HEIGHTxWIDTH,...\"")
    try:
        buckets = parse_resolutions([text], MULTIPLE)
    except ValueError as e:
        raise ValueError(f"{label}: resolution: {e}") from None
    mode = get("frame_extraction", str, "head")
    if mode not in EXTRACTIONS:
        raise ValueError(f"{label}: frame_extraction = {mode!r}: expected one of {', '.join(EXTRACTIONS)}")
    max_frames = positive("max_frames")
    if folders[0] == "image_directory":
        target = (1,)
    elif mode == "full":
        if max_frames is None:
            raise ValueError(f"{label}: frame_extraction = \"full\" needs max_frames")
        target = (max_frames,)
    else:
        frames = values.get("target_frames")
        if not isinstance(frames, list) or not frames or not all(isinstance(f, int) and not isinstance(f, bool) for f in frames):
            raise ValueError(f"{label}: target_frames = {frames!r}: expected a list of frame counts, e.g. [1, 25, 45]")
        try:
            target = tuple(parse_frames([",".join(map(str, frames))]))
        except ValueError as e:
            raise ValueError(f"{label}: target_frames: {e}") from None
    extraction = FrameExtraction(mode, target, positive("frame_stride", 1), positive("frame_sample", 1), max_frames)
    fps = get("fps", (int, float))
    repeats = positive("num_repeats", 1)
    if repeats > MAX_REPEATS:
        raise ValueError(f"{label}: num_repeats = {repeats}: at most {MAX_REPEATS}")
    caption_extension = get("caption_extension", str, ".txt")
    if not caption_extension.startswith(".") or "/" in caption_extension:
        raise ValueError(f"{label}: caption_extension = {caption_extension!r}: expected a file extension such as \".txt\"")
    name = get("name", str, folder.name)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{label}: name = {name!r}: must be a non-empty folder-like name without /")
    return DatasetSpec(folder, name, buckets, extraction, check_fps(None if fps is None else float(fps), f"{label}: fps"),
                       caption_extension, repeats)
