"""Hostile and careless inputs to the Python data tools (issue 21), each fed to the real tool
(`python -m flowstep_export.<tool>` in a subprocess, with a timeout so that a hang fails): a
bad input exits non-zero with exactly one `error:` line naming the file or flag and what is
wrong, no traceback, reads nothing outside what the user named, and leaves nothing partial
under a final name."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from wan_fixtures import TEXT_LEN, write_video

EXPORT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"flowstep_export.{tool}", *map(str, args)], cwd=EXPORT,
                          capture_output=True, text=True, timeout=TIMEOUT)


def one_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """The single stderr line of a failed run, which must contain every one of `words`."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def samples(out: Path) -> list[str]:
    """Every file under `out` (hidden temporaries included)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()) if out.exists() else []


def prepare(videos: Path, out: Path, encoders: Path, *extra, vae=None, text_encoder=None):
    return run_tool("data.prepare", "--videos", videos, "--out", out, "--vae", vae or encoders / "vae.pth",
                    "--text-encoder", text_encoder or encoders / "t5.pth", "--tokenizer", encoders / "tokenizer",
                    "--resolution", "32x48", "--frames", "5", "--text-len", TEXT_LEN, "--precision", "float32", "-q",
                    *extra)


def encode(out: Path, encoders: Path, *extra, text_encoder=None):
    return run_tool("data.encode_prompts", "--out", out, "--text-encoder", text_encoder or encoders / "t5.pth",
                    "--tokenizer", encoders / "tokenizer", "--text-len", TEXT_LEN, "--precision", "float32", *extra)


def clip_folder(d: Path, caption: str | bytes = "a red ball", name: str = "clip") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_video(d / f"{name}.mp4", frames=5, height=32, width=48)
    txt = d / f"{name}.txt"
    txt.write_bytes(caption) if isinstance(caption, bytes) else txt.write_text(caption)
    return d


def save_cache_sample(path: Path, shared_extra=None, context=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    shared = {"input_latents": torch.randn(1, 16, 2, 4, 4), **(shared_extra or {})}
    torch.save((shared, {"context": torch.randn(1, 16, 64) if context is None else context}, {}), path)


# 1. Code execution ---------------------------------------------------------------------------

class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_convert_never_runs_a_pickled_command(tmp_path):
    marker = tmp_path / "pwned"
    save_cache_sample(tmp_path / "cache" / "0.pth", {"payload": RunsCommand(f"touch {marker}")})
    out = tmp_path / "data"
    r = run_tool("data.convert_diffsynth", tmp_path / "cache", out)
    assert not marker.exists(), "unpickling the cache ran its command"
    one_error(r, "0.pth", "refused", "system")
    assert samples(out) == []


def test_convert_reads_diffsynth_caches_with_images_without_unpickling_them(tmp_path):
    """DiffSynth's cache holds the PIL frames and plain values beside the tensors: they load as
    stand-ins (never decoded; PIL need not even be importable)."""
    video = [Image.new("RGB", (48, 32)) for _ in range(5)]
    save_cache_sample(tmp_path / "cache" / "0.pth", {"input_video": video, "input_image": video[0], "height": 32,
                                                     "rand_device": "cuda", "tiled": False, "cfg_scale": 1})
    r = run_tool("data.convert_diffsynth", tmp_path / "cache", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "data").glob("*.safetensors"))) == 1


# 2. Reading outside what the user named ------------------------------------------------------

@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_prepare_refuses_metadata_paths_outside_videos(encoders, tmp_path, where):
    outside = clip_folder(tmp_path / "outside")
    videos = tmp_path / "videos"
    clip_folder(videos)
    path = "../outside/clip.mp4" if where == "parent" else str(outside / "clip.mp4")
    (videos / "metadata.csv").write_text(f"video,prompt\nclip.mp4,a red ball\n{path},stolen\n")
    out = tmp_path / "data"
    r = prepare(videos, out, encoders)
    one_error(r, "metadata.csv", "row 2", path, "outside --videos")
    assert samples(out) == []


def test_prepare_warns_about_links_out_of_videos(encoders, tmp_path):
    outside = clip_folder(tmp_path / "outside")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "link.mp4").symlink_to(outside / "clip.mp4")
    (videos / "link.txt").write_text("a red ball")
    out = tmp_path / "data"
    r = prepare(videos, out, encoders)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:"), r.stderr
    assert "link.mp4" in lines[0] and str(outside / "clip.mp4") in lines[0], lines
    assert samples(out) == ["link.mp4.safetensors"]


# 3. Hangs and unbounded reads ----------------------------------------------------------------

def fifo_or_zero(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind, word", [("fifo", "FIFO"), ("zero", "device")])
def test_special_files_as_inputs_neither_hang_nor_are_ignored(encoders, tmp_path, kind, word):
    # a caption
    videos = clip_folder(tmp_path / "caption")
    (videos / "clip.txt").unlink()
    fifo_or_zero(videos / "clip.txt", kind)
    one_error(prepare(videos, tmp_path / "o1", encoders), "clip.txt", word)
    # metadata.csv
    videos = clip_folder(tmp_path / "metadata")
    fifo_or_zero(videos / "metadata.csv", kind)
    one_error(prepare(videos, tmp_path / "o2", encoders), "metadata.csv", word)
    # a video
    videos = clip_folder(tmp_path / "video")
    (videos / "clip.mp4").unlink()
    fifo_or_zero(videos / "clip.mp4", kind)
    one_error(prepare(videos, tmp_path / "o3", encoders), "clip.mp4", word)
    # --vae
    fifo_or_zero(tmp_path / "vae.pth", kind)
    one_error(prepare(clip_folder(tmp_path / "ok"), tmp_path / "o4", encoders, vae=tmp_path / "vae.pth"),
              "--vae", "vae.pth", word)
    # --from-file
    fifo_or_zero(tmp_path / "prompts.txt", kind)
    one_error(encode(tmp_path / "o5", encoders, "--from-file", tmp_path / "prompts.txt"), "--from-file", word)
    # a DiffSynth cache sample
    save_cache_sample(tmp_path / "cache" / "0.pth")
    fifo_or_zero(tmp_path / "cache" / "1.pth", kind)
    one_error(run_tool("data.convert_diffsynth", tmp_path / "cache", tmp_path / "o6"), "1.pth", word)
    for i in range(1, 7):
        assert samples(tmp_path / f"o{i}") == []


def test_prepare_checks_image_size_before_resizing(encoders, tmp_path):
    """A 1x65535 image would be scaled to 48x3.1M pixels to cover a 32x48 bucket."""
    videos = tmp_path / "videos"
    videos.mkdir()
    Image.new("RGB", (1, 65535)).save(videos / "thin.png")
    (videos / "thin.txt").write_text("a red ball")
    out = tmp_path / "data"
    one_error(prepare(videos, out, encoders), "thin.png", "1x65535")
    assert samples(out) == []


# 4. Silent acceptance ------------------------------------------------------------------------

def test_caption_bom_is_not_part_of_the_caption(encoders, tmp_path):
    videos = clip_folder(tmp_path / "videos", "\ufeffa red ball".encode())
    out = tmp_path / "data"
    r = prepare(videos, out, encoders)
    assert r.returncode == 0, r.stderr
    with safe_open(str(out / "clip.mp4.safetensors"), "pt") as f:
        assert f.metadata()["caption"] == "a red ball"


def broken(src: Path, dst: Path, key: str) -> Path:
    """A copy of a checkpoint with one weight set to NaN: the encoder's outputs are all NaN."""
    state = torch.load(src, weights_only=True)
    state[key] = torch.full_like(state[key], math.nan)
    torch.save(state, dst)
    return dst


@pytest.mark.parametrize("which", ["vae", "text_encoder"])
def test_prepare_refuses_nonfinite_encoder_outputs(encoders, tmp_path, which):
    bad = {"vae": dict(vae=broken(encoders / "vae.pth", tmp_path / "vae.pth", "conv1.weight")),
           "text_encoder": dict(text_encoder=broken(encoders / "t5.pth", tmp_path / "t5.pth", "norm.weight"))}[which]
    out = tmp_path / "data"
    one_error(prepare(clip_folder(tmp_path / "videos"), out, encoders, **bad), "clip.mp4", "NaN")
    assert samples(out) == []


def test_encode_prompts_refuses_nonfinite_contexts(encoders, tmp_path):
    out = tmp_path / "p"
    one_error(encode(out, encoders, "a red ball", text_encoder=broken(encoders / "t5.pth", tmp_path / "t5.pth", "norm.weight")),
              "a red ball", "NaN")
    assert samples(out) == []


@pytest.mark.parametrize("low, high", [(0.9, 0.1), (0.5, 0.5), (-0.5, 0.5), (0.2, 1.5), (math.nan, 1.0)])
def test_convert_refuses_bad_timestep_boundaries(tmp_path, low, high):
    save_cache_sample(tmp_path / "cache" / "0.pth", {"min_timestep_boundary": low, "max_timestep_boundary": high})
    out = tmp_path / "data"
    one_error(run_tool("data.convert_diffsynth", tmp_path / "cache", out), "0.pth", "timestep_boundary")
    assert samples(out) == []


@pytest.mark.parametrize("name, shape", [("input_latents", (2, 16, 2, 4, 4)), ("context", (2, 16, 64))])
def test_convert_refuses_a_batch_of_two(tmp_path, name, shape):
    """A cache entry holding two videos or two prompts is refused, not cut to its first row."""
    extra = {"input_latents": torch.randn(*shape)} if name == "input_latents" else None
    save_cache_sample(tmp_path / "cache" / "0.pth", extra, context=torch.randn(*shape) if name == "context" else None)
    out = tmp_path / "data"
    one_error(run_tool("data.convert_diffsynth", tmp_path / "cache", out), "0.pth", name, "batch 2")
    assert samples(out) == []


# 5. Tracebacks -------------------------------------------------------------------------------

def corrupt_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"a": torch.zeros(4)}, d / "whole.pth")
    data = (d / "whole.pth").read_bytes()
    files = {"empty.pth": b"", "truncated.pth": data[:len(data) // 2], "garbage.pth": b"\x80\x04garbage" * 10,
             "header.safetensors": b"\xff" * 8 + b"{not json" * 4}
    for name, content in files.items():
        (d / name).write_bytes(content)
    torch.save({"token_embedding.weight": 3, "conv2.weight": "x"}, d / "values.pth")  # not tensors
    torch.save({"token_embedding.weight": torch.zeros(8)}, d / "flat.pth")  # a 1-D embedding
    return {p.name: p for p in d.iterdir() if p.name != "whole.pth"}


def test_corrupt_checkpoints_are_one_line_naming_the_file(encoders, tmp_path):
    files = corrupt_files(tmp_path / "bad")
    videos = clip_folder(tmp_path / "videos")
    for name, path in files.items():
        one_error(prepare(videos, tmp_path / "o", encoders, text_encoder=path), name)
        if name.endswith(".pth") and name != "values.pth":  # a DiffSynth cache sample
            cache = tmp_path / "cache" / name
            cache.mkdir(parents=True)
            (cache / name).write_bytes(path.read_bytes())
            one_error(run_tool("data.convert_diffsynth", cache, tmp_path / "c"), name)
    for name in ("empty.pth", "header.safetensors", "values.pth"):
        one_error(run_tool("pipeline.vae_decoder", "--vae", files[name], "--out", tmp_path / "d"), name)
        one_error(encode(tmp_path / "p", encoders, "a ball", text_encoder=files[name]), name)
    for out in ("o", "c", "d", "p"):
        assert samples(tmp_path / out) == []


# 6. Options checked up front -----------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--fps", "0"), ("--fps", "-1"), ("--fps", "inf"), ("--fps", "nan"), ("--fps", "1e-300"), ("--fps", "1e9"),
    ("--text-len", "0"), ("--text-len", "-1"), ("--text-len", "100000000"),
    ("--frames", "0"), ("--frames", "-3"), ("--frames", "400001"),
    ("--resolution", "0x48"), ("--resolution", "-16x48"), ("--resolution", "65536x65536"),
])
def test_prepare_checks_numbers_before_any_work(tmp_path, flag, value):
    """Checked before anything is read: the encoders named here do not exist."""
    args = {"--resolution": "32x48", "--frames": "5", "--text-len": "16", flag: value}
    out = tmp_path / "data"
    r = run_tool("data.prepare", "--videos", tmp_path, "--out", out, "--vae", tmp_path / "no.pth", "--text-encoder",
                 tmp_path / "no.pth", "--tokenizer", tmp_path / "no", *[f"{k}={v}" for k, v in args.items()])
    one_error(r, flag)
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-1", "100000000"])
def test_encode_prompts_checks_text_len_first(tmp_path, value):
    out = tmp_path / "p"
    r = run_tool("data.encode_prompts", "a ball", "--out", out, "--text-encoder", tmp_path / "no.pth",
                 "--tokenizer", tmp_path / "no", f"--text-len={value}")
    one_error(r, f"--text-len {value}")
    assert not out.exists()


# 7. Partial or overwritten output ------------------------------------------------------------

def test_prepare_output_names_are_injective_and_visible(encoders, tmp_path):
    videos = tmp_path / "videos"
    clip_folder(videos / "a", "a red ball", name="b")
    clip_folder(videos, "a blue square", name="a__b")
    clip_folder(videos, "the night sky", name=".hidden")
    out = tmp_path / "data"
    r = prepare(videos, out, encoders)
    assert r.returncode == 0 and "3 prepared" in r.stdout, r.stderr
    names = samples(out)
    assert len(names) == 3 and not any(n.startswith(".") for n in names), names
    captions = set()
    for name in names:
        with safe_open(str(out / name), "pt") as f:
            captions.add(f.metadata()["caption"])
    assert captions == {"a red ball", "a blue square", "the night sky"}


def test_prepare_refuses_rows_naming_one_file_twice(encoders, tmp_path):
    videos = clip_folder(tmp_path / "videos")
    (videos / "metadata.csv").write_text("video,prompt\nclip.mp4,a red ball\n./clip.mp4,a blue square\n")
    out = tmp_path / "data"
    one_error(prepare(videos, out, encoders), "metadata.csv", "rows 1 and 2")
    assert samples(out) == []


def test_convert_leaves_nothing_when_a_later_sample_fails(tmp_path):
    save_cache_sample(tmp_path / "cache" / "0.pth")
    save_cache_sample(tmp_path / "cache" / "1.pth", context=torch.full((1, 16, 64), math.nan))
    out = tmp_path / "data"
    one_error(run_tool("data.convert_diffsynth", tmp_path / "cache", out), "1.pth", "NaN")
    assert samples(out) == []


# 8. Messages ---------------------------------------------------------------------------------

def test_metadata_csv_with_bom_is_read(encoders, tmp_path):
    videos = clip_folder(tmp_path / "videos")
    (videos / "metadata.csv").write_bytes("\ufeffvideo,prompt\nclip.mp4,a red ball\n".encode())
    out = tmp_path / "data"
    r = prepare(videos, out, encoders)
    assert r.returncode == 0 and "1 prepared" in r.stdout, r.stderr
    assert samples(out) == ["clip.mp4.safetensors"]


def test_latin1_text_is_one_line_naming_the_file(encoders, tmp_path):
    latin1 = "a caf\u00e9 at night".encode("latin-1")
    videos = clip_folder(tmp_path / "caption", latin1)
    one_error(prepare(videos, tmp_path / "o1", encoders), "clip.txt", "not UTF-8")
    videos = clip_folder(tmp_path / "metadata")
    (videos / "metadata.csv").write_bytes(b"video,prompt\nclip.mp4," + latin1 + b"\n")
    one_error(prepare(videos, tmp_path / "o2", encoders), "metadata.csv", "not UTF-8")
    (tmp_path / "prompts.txt").write_bytes(latin1)
    one_error(encode(tmp_path / "o3", encoders, "--from-file", tmp_path / "prompts.txt"), "prompts.txt", "not UTF-8")
    for out in ("o1", "o2", "o3"):
        assert samples(tmp_path / out) == []
