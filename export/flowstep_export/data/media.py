"""Reading training videos and images into size buckets, as DiffSynth's data operators do.

Videos (mp4, webm, mov, mkv, avi, gif) are decoded by ffmpeg through imageio (imageio-ffmpeg ships
the binary); still images by Pillow. Each file goes to the resolution bucket nearest its aspect
ratio, is resized so that it covers the bucket (bilinear) and centre-cropped, as DiffSynth's
`ImageCropAndResize`; a video gets the longest frame bucket it can fill, frames taken from the
start (or resampled to `fps`, as DiffSynth's `fix_frame_rate`), or, with a dataset config, the
clips musubi-tuner's `frame_extraction` cuts from it (FrameExtraction). A still image is one frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import one_line

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Bounds on the numbers that size the pixel arrays: far above Wan's 1280x720, 81 frames.
MAX_SIDE = 4096
MAX_FRAMES = 1025
MAX_SOURCE_PIXELS = 1 << 26  # 8K UHD is 33 M pixels
# A file is resized to cover its bucket, then cropped; an aspect ratio so far from every
# bucket's that the resized frame exceeds this many buckets would crop away nearly all of it
# (and a 1x65535 image would be resized to tens of millions of pixels).
MAX_COVER = 8


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def parse_resolutions(values: list[str], multiple: int) -> list[Bucket]:
    """`480x832` (HEIGHTxWIDTH), repeatable or comma-separated; each side a multiple of `multiple`."""
    buckets = []
    for item in (v.strip() for value in values for v in value.split(",")):
        try:
            height, width = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--resolution {item!r}: expected HEIGHTxWIDTH, e.g. 480x832") from None
        if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or height % multiple or width % multiple:
            raise ValueError(f"--resolution {item}: height and width must be multiples of {multiple} "
                             f"(the VAE's compression times the DiT's patch 2) from {multiple} to {MAX_SIDE}")
        buckets.append(Bucket(height, width))
    if not buckets:
        raise ValueError("--resolution: give at least one HEIGHTxWIDTH")
    return sorted(set(buckets), key=lambda b: (b.height * b.width, b.height))


def parse_frames(values: list[str]) -> list[int]:
    """Frame buckets, repeatable or comma-separated; each 4k+1 (Wan's VAE packs 4 frames after the first)."""
    frames = []
    for item in (v.strip() for value in values for v in value.split(",")):
        try:
            n = int(item)
        except ValueError:
            raise ValueError(f"--frames {item!r}: expected a number of frames such as 81") from None
        if not 1 <= n <= MAX_FRAMES or n % 4 != 1:
            raise ValueError(f"--frames {n}: must be 4k+1 (1, 5, 9, ..., 81), at most {MAX_FRAMES}")
        frames.append(n)
    if not frames:
        raise ValueError("--frames: give at least one frame count")
    return sorted(set(frames))


def nearest_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio); ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.height * b.width))


def bucket_for(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket a `width`x`height` frame goes to; ValueError (one line) when it is too large or
    too far from every bucket's aspect ratio. Checked before anything is decoded or resized."""
    if width < 1 or height < 1:
        raise ValueError(f"is {width}x{height}: no pixels")
    if width * height > MAX_SOURCE_PIXELS:
        raise ValueError(f"is {width}x{height}, more than {MAX_SOURCE_PIXELS >> 20} M pixels")
    bucket = nearest_bucket(height, width, buckets)
    scale = max(bucket.width / width, bucket.height / height)
    covered = round(width * scale) * round(height * scale)
    if covered > MAX_COVER * bucket.height * bucket.width:
        raise ValueError(f"is {width}x{height}: covering the nearest bucket {bucket} would resize it to "
                         f"{round(width * scale)}x{round(height * scale)} and crop away all but 1/{covered // (bucket.height * bucket.width)}")
    return bucket


def crop_and_resize(image, bucket: Bucket):
    """DiffSynth's ImageCropAndResize: scale to cover the bucket (bilinear), then centre-crop."""
    from PIL import Image

    width, height = image.size
    scale = max(bucket.width / width, bucket.height / height)
    image = image.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    # torchvision's center_crop offsets.
    top = int(round((image.height - bucket.height) / 2.0))
    left = int(round((image.width - bucket.width) / 2.0))
    return image.crop((left, top, left + bucket.width, top + bucket.height))


EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")
VAE_FRAME_STRIDE = 4


@dataclass(frozen=True)
class FrameExtraction:
    """Which clips of a video become samples. `longest` (prepare's flags): the longest of
    `target_frames` the video fills, from its first frame. The others are musubi-tuner's dataset
    config `frame_extraction` (docs/dataset_config.md), over the video's frames (after --fps):
    head: the first N frames, for each N of target_frames the video fills; chunk: consecutive
    non-overlapping N-frame clips; slide: N-frame clips starting every `stride` frames; uniform:
    `sample` N-frame clips with starts evenly spaced from the first to the last possible
    (truncated); full: the whole video up to `max_frames`, cut to 4k+1 frames."""

    mode: str
    target_frames: tuple[int, ...]
    stride: int = 1
    sample: int = 1
    max_frames: int | None = None

    def windows(self, count: int) -> list[tuple[int, int]]:
        """(first frame, frames) of each clip of a `count`-frame video, each clip once."""
        fits = [n for n in self.target_frames if n <= count]
        if self.mode == "longest":
            spans = [(0, max(fits))] if fits else []
        elif self.mode == "head":
            spans = [(0, n) for n in fits]
        elif self.mode == "chunk":
            spans = [(start, n) for n in fits for start in range(0, count - n + 1, n)]
        elif self.mode == "slide":
            spans = [(start, n) for n in fits for start in range(0, count - n + 1, self.stride)]
        elif self.mode == "uniform":
            spans = [(int(start), n) for n in fits for start in np.linspace(0, count - n, self.sample, dtype=int)]
        elif self.mode == "full":
            frames = min(count, self.max_frames)
            spans = [(0, (frames - 1) // VAE_FRAME_STRIDE * VAE_FRAME_STRIDE + 1)]
        else:
            raise ValueError(f"frame_extraction {self.mode!r}: expected one of {', '.join(EXTRACTIONS)}")
        return list(dict.fromkeys(spans))

    def describe(self) -> str:
        """The settings as recorded in each sample (a change re-encodes it)."""
        frames = ",".join(map(str, self.target_frames))
        return {"longest": f"longest {frames}", "head": f"head {frames}", "chunk": f"chunk {frames}",
                "slide": f"slide {frames} stride {self.stride}", "uniform": f"uniform {frames} sample {self.sample}",
                "full": f"full max_frames {self.max_frames}"}[self.mode]


def frame_ids(available: int, raw_fps: float, frames: int, fps: float | None) -> list[int]:
    """Source frame indices for `frames` output frames: consecutive, or resampled to `fps`."""
    if fps is None:
        return list(range(frames))
    return [min(int(round(i / fps * raw_fps)), available - 1) for i in range(frames)]


@dataclass
class Clip:
    """Frames ready for the VAE: [3, T, H, W] float32 in [-1, 1]."""

    pixels: np.ndarray
    bucket: Bucket
    source_frames: int
    start: int = 0  # first frame of the clip in the (resampled) video


def read_clips(path: Path, buckets: list[Bucket], extraction: FrameExtraction, fps: float | None) -> Iterator[Clip]:
    """Decodes `path` into its bucket, one Clip per window of `extraction` (an image: one
    frame), each made when it is taken (the frames are held once, as 8-bit images). ValueError
    (one line) when it cannot be used."""
    from PIL import Image

    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as img:  # reads the header only
                bucket = bucket_for(img.width, img.height, buckets)
                image = img.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image: {one_line(e)}") from None
        return iter([Clip(to_pixels([crop_and_resize(image, bucket)]), bucket, 1)])
    import imageio.v2 as iio

    try:
        reader = iio.get_reader(path, format="FFMPEG")
    except Exception as e:  # imageio raises plain Exceptions for undecodable files
        raise ValueError(f"cannot decode video: {one_line(e)}") from None
    try:
        meta = reader.get_meta_data()
        bucket = bucket_for(*meta["size"], buckets)
        total = reader.count_frames()
        raw_fps = float(meta.get("fps") or 0)
        available = total if fps is None else math.floor(meta.get("duration", total / max(raw_fps, 1e-9)) * fps)
        windows = extraction.windows(available)
        if not windows:
            raise ValueError(f"has {available} frames{'' if fps is None else f' at {fps:g} fps'}; the shortest frame bucket is {min(extraction.target_frames)}")
        if fps is not None and raw_fps <= 0:
            raise ValueError("has no frame rate in its metadata, so --fps cannot resample it")
        ids = frame_ids(total, raw_fps, max(start + n for start, n in windows), fps)
        frames = {}  # source frame index -> cropped frame, decoded once for all clips
        for i in sorted({ids[j] for start, n in windows for j in range(start, start + n)}):
            frames[i] = crop_and_resize(Image.fromarray(reader.get_data(i)).convert("RGB"), bucket)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot decode video: {one_line(e)}") from None
    finally:
        reader.close()
    return (Clip(to_pixels([frames[ids[j]] for j in range(start, start + n)]), bucket, total, start) for start, n in windows)


def read_image(path: Path, bucket: Bucket) -> np.ndarray:
    """The image `path` cropped to `bucket` (an I2V clip's input image): [3, H, W] in [-1, 1].
    ValueError (one line, naming it) when it cannot be used."""
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            bucket_for(img.width, img.height, [bucket])
            image = img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"input image {path}: {e}") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"input image {path}: cannot decode image: {one_line(e)}") from None
    return to_pixels([crop_and_resize(image, bucket)])[:, 0]


def to_pixels(images) -> np.ndarray:
    """PIL frames -> [3, T, H, W] in [-1, 1], as DiffSynth's `preprocess_video`."""
    video = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # T H W C
    return np.ascontiguousarray((video * (2 / 255) - 1).transpose(3, 0, 1, 2))
