"""`prepare --config`: musubi-tuner's dataset config (several folders, repeats, caption
extensions, frame extraction).

The clips are checked two ways:
- against the examples of musubi's own docs (docs/dataset_config.md at 30c658c4: a 40-frame video
  cut by head, chunk, slide and uniform; DOCUMENTED below, transcribed from its diagrams), always;
- against musubi-tuner's own code when MUSUBI_TUNER_DIR names a checkout of it: its
  `VideoDataset.retrieve_latent_cache_batches` runs on stand-in videos of many lengths (its
  decoder and resizer, cv2/av/`resize_image_to_bucket`, replaced by no-ops: frames are already
  at size), and the clips it names (`KEY_START-FRAMES`) must be flowstep's windows exactly.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from flowstep_export.data.media import FrameExtraction
from flowstep_export.data.prepare import main as prepare_main
from wan_fixtures import TEXT_LEN, write_video

# musubi's docs, "frame_extraction Options", a 40-frame video: (first frame, frames) of each clip.
DOCUMENTED = [
    (FrameExtraction("head", (1, 13, 25)), [(0, 1), (0, 13), (0, 25)]),
    (FrameExtraction("chunk", (13, 25)), [(0, 13), (13, 13), (26, 13), (0, 25)]),
    (FrameExtraction("slide", (1, 13, 25), stride=10),
     [(0, 1), (10, 1), (20, 1), (30, 1), (0, 13), (10, 13), (20, 13), (0, 25), (10, 25)]),
    (FrameExtraction("uniform", (1, 13, 25), sample=4),
     [(0, 1), (13, 1), (26, 1), (39, 1), (0, 13), (9, 13), (18, 13), (27, 13), (0, 25), (5, 25), (10, 25), (15, 25)]),
]


@pytest.mark.parametrize("extraction, clips", DOCUMENTED, ids=lambda v: getattr(v, "mode", ""))
def test_windows_are_musubis_documented_examples(extraction, clips):
    assert extraction.windows(40) == clips


def musubi_clips(checkout: Path, frame_counts: list[int], **options) -> list[set[tuple[int, int]]]:
    """The clips musubi-tuner's VideoDataset cuts from videos of `frame_counts` frames."""
    sys.path.insert(0, str(checkout / "src"))
    for name in ("cv2", "av"):  # its decoders, unused here
        sys.modules.setdefault(name, types.ModuleType(name))
    import musubi_tuner.dataset.image_video_dataset as ivd

    ivd.resize_image_to_bucket = lambda frame, reso: frame

    class Videos:  # stands in for its VideoDirectoryDatasource
        has_control = False

        def set_bucket_selector(self, selector): pass
        def set_source_and_target_fps(self, source, target): pass
        def set_start_and_end_frame(self, start, end): pass

        def __iter__(self):
            for i, n in enumerate(frame_counts):
                yield lambda i=i, n=n: (f"v{i}.mp4", [np.zeros((16, 16, 3), np.uint8)] * n, "caption")

    dataset = ivd.VideoDataset(resolution=(256, 256), caption_extension=".txt", batch_size=1, num_repeats=1,
                               enable_bucket=False, bucket_no_upscale=False, video_directory=str(checkout),
                               architecture="wan", **options)
    dataset.datasource = Videos()
    clips = [set() for _ in frame_counts]
    for _, batch in dataset.retrieve_latent_cache_batches(1):
        for item in batch:
            key, span = item.item_key.removesuffix(".mp4").rsplit("_", 1)
            start, frames = span.split("-")
            clips[int(key[1:])].add((int(start), int(frames)))
    return clips


CASES = [
    dict(frame_extraction="head", target_frames=[1, 5, 13, 25, 81]),
    dict(frame_extraction="chunk", target_frames=[5, 13, 25]),
    dict(frame_extraction="slide", target_frames=[1, 9, 21], frame_stride=1),
    dict(frame_extraction="slide", target_frames=[5, 13, 25], frame_stride=7),
    dict(frame_extraction="uniform", target_frames=[1, 13, 25], frame_sample=4),
    dict(frame_extraction="uniform", target_frames=[9, 33], frame_sample=7),
    dict(frame_extraction="uniform", target_frames=[5], frame_sample=1),
    dict(frame_extraction="full", max_frames=31),
    dict(frame_extraction="full", max_frames=81),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_windows_are_musubi_tunes_own(case):
    checkout = os.environ.get("MUSUBI_TUNER_DIR")
    if not checkout:
        pytest.skip("MUSUBI_TUNER_DIR (a musubi-tuner checkout) not set")
    counts = list(range(1, 130))
    expected = musubi_clips(Path(checkout), counts, **case)
    mode = case["frame_extraction"]
    ours = FrameExtraction(mode, tuple(case.get("target_frames", [case.get("max_frames")])), case.get("frame_stride", 1),
                           case.get("frame_sample", 1), case.get("max_frames"))
    for count, theirs in zip(counts, expected):
        assert set(ours.windows(count)) == theirs, f"{case}, {count} frames"
        assert len(ours.windows(count)) == len(theirs), "each clip once"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders: 13-frame videos with .txt captions, and an image folder with .caption files."""
    root = tmp_path_factory.mktemp("folders")
    (root / "clips").mkdir()
    for i in range(2):
        write_video(root / "clips" / f"v{i}.mp4", frames=13, height=40, width=56)
        (root / "clips" / f"v{i}.txt").write_text("a red ball rolls left\n")
    (root / "stills").mkdir()
    from PIL import Image

    Image.fromarray(np.full((40, 56, 3), 200, np.uint8)).save(root / "stills" / "s.png")
    (root / "stills" / "s.caption").write_text("blue square\n")
    return root


def run(config: Path, encoders, out: Path, capsys, text: str):
    config.write_text(text)
    rc = prepare_main(["--config", str(config), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       "--text-len", str(TEXT_LEN), "--precision", "float32", "--dtype", "f32", "-q"])
    return rc, capsys.readouterr()


def names(out: Path) -> list[str]:
    return sorted(p.name.removesuffix(".safetensors") for p in out.glob("*.safetensors"))


def test_config_prepares_clips_repeats_and_caption_extensions(folders, encoders, tmp_path, capsys):
    out, config = tmp_path / "data", folders / "dataset.toml"
    rc, io = run(config, encoders, out, capsys, """
[general]
resolution = [48, 32]
batch_size = 1

[[datasets]]
video_directory = "clips"
target_frames = [5, 9]
frame_extraction = "slide"
frame_stride = 4

[[datasets]]
image_directory = "stills"
caption_extension = ".caption"
num_repeats = 3
""")
    assert rc == 0, io.err
    assert "batch_size is ignored" in io.err
    # 13 frames, slide by 4: 5-frame clips at 0, 4, 8; 9-frame clips at 0, 4.
    clips = [f"{a}-{b}" for b in ("005", "009") for a in ("00000", "00004", "00008") if not (b == "009" and a == "00008")]
    assert names(out) == sorted([f"clips__v{i}.mp4__{c}" for i in range(2) for c in clips]
                                + ["stills__s.png", "stills__s.png__repeat-2", "stills__s.png__repeat-3"])
    with safe_open(str(out / "clips__v1.mp4__00004-009.safetensors"), "pt") as f:
        assert f.get_slice("latents").get_shape() == [16, 3, 4, 6]
        assert (f.metadata()["first_frame"], f.metadata()["frame_extraction"]) == ("4", "slide 5,9 stride 4")
    assert os.path.samefile(out / "stills__s.png.safetensors", out / "stills__s.png__repeat-3.safetensors")
    # The same config again: nothing encoded. Another stride: the clips it no longer makes are gone.
    rc, io = run(config, encoders, out, capsys, config.read_text())
    assert rc == 0 and io.out.startswith("0 prepared"), io.out
    rc, io = run(config, encoders, out, capsys, config.read_text().replace("frame_stride = 4", "frame_stride = 8").replace("num_repeats = 3", "num_repeats = 1"))
    assert rc == 0, io.err
    assert names(out) == sorted([f"clips__v{i}.mp4__{c}" for i in range(2) for c in ("00000-005", "00008-005", "00000-009")]
                                + ["stills__s.png"])


@pytest.mark.parametrize("text, message", [
    ("[[datasets]]\nvideo_directory = 'clips'\nresolution = [48, 32]\n", "target_frames"),
    ("[[datasets]]\nvideo_directory = 'clips'\nresolution = [48, 32]\ntarget_frames = [8]\n", "4k+1"),
    ("[[datasets]]\nvideo_directory = 'clips'\nresolution = [48, 32]\ntarget_frames = [5]\nframe_extraction = 'random'\n", "frame_extraction"),
    ("[[datasets]]\nvideo_directory = 'clips'\nresolution = [48, 32]\nframe_extraction = 'full'\n", "max_frames"),
    ("[[datasets]]\nvideo_directory = 'clips'\nresolution = [48, 32]\ntarget_frames = [5]\nnum_repeat = 2\n", "unknown key 'num_repeat'"),
    ("[general]\nframe_extraction = 'head'\n[[datasets]]\nvideo_directory = 'clips'\n", "belongs to each [[datasets]]"),
    ("[[datasets]]\nvideo_directory = 'clips'\nresolution = [48, 32]\ntarget_frames = [5]\n"
     "[[datasets]]\nimage_directory = 'clips'\nresolution = [48, 32]\n", "two datasets are named 'clips'"),
    ("[[datasets]\n", "not TOML"),
])
def test_bad_configs_are_one_line(folders, encoders, tmp_path, capsys, text, message):
    rc, io = run(tmp_path / "bad.toml", encoders, tmp_path / "data", capsys, text)
    assert rc != 0 and message in io.err and len(io.err.strip().splitlines()) == 1, io.err
    assert "Traceback" not in io.err
