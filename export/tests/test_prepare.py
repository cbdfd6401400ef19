"""`python -m flowstep_export.data.prepare` on generated videos with small random Wan encoders: the
samples equal DiffSynth's own pipeline units on the same files (its video loader, crop, VAE and
prompt embedder), land in two size buckets, skip bad files with one line, resume, and load in
`flowstep eval`."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowstep_export.data.prepare import main as prepare_main
from independent import TINY, flowstep_bin
from wan_fixtures import TEXT_LEN, reference_vae, reference_vae22, text_encoder_config, write_video

CAPTIONS = {"wide.mp4": "a red ball rolls left", "tall.webm": "blue square over the green sky", "still.png": "the night sky"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "wide.mp4", frames=11, height=40, width=56)  # landscape: 32x48 bucket, 9 frames
    sub = d / "more"
    sub.mkdir()
    write_video(sub / "tall.webm", frames=6, height=56, width=40, codec="libvpx-vp9")  # portrait: 48x32, 5 frames
    Image.fromarray((np.arange(30 * 44 * 3) % 251).astype(np.uint8).reshape(30, 44, 3)).save(d / "still.png")
    for name, caption in CAPTIONS.items():
        path = (sub if name == "tall.webm" else d) / name
        path.with_suffix(".txt").write_text(caption + "\n")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (d / "broken.txt").write_text("a red ball")
    write_video(d / "uncaptioned.mp4", frames=5, height=32, width=48)
    write_video(d / "short.mp4", frames=3, height=32, width=48)
    (d / "short.txt").write_text("a ball")
    return d


def run_prepare(videos, encoders, out, capsys):
    rc = prepare_main(["--videos", str(videos), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       "--resolution", "32x48,48x32", "--frames", "5", "--frames", "9", "--text-len", str(TEXT_LEN),
                       "--dtype", "f32", "--precision", "float32", "-q"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def diffsynth_reference(path, caption, frames, height, width, encoders, fps=None, ti2v=False):
    """DiffSynth's pipeline units on the same file: LoadVideo + ImageCropAndResize, then
    WanVideoUnit_InputVideoEmbedder and WanVideoUnit_PromptEmbedder; with `ti2v`, the Wan2.2 VAE
    (WanVideoVAE38) and WanVideoUnit_ImageEmbedderFused on the clip's frame 0, the `input_image`
    DiffSynth's training passes (examples/wanvideo/model_training/train.py: data["video"][0]).
    Returns the sample's tensors by name."""
    from types import SimpleNamespace

    from diffsynth.core.data.operators import ImageCropAndResize, LoadVideo
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
    from diffsynth.pipelines.wan_video import (WanVideoPipeline, WanVideoUnit_ImageEmbedderFused,
                                               WanVideoUnit_InputVideoEmbedder, WanVideoUnit_PromptEmbedder)

    crop = ImageCropAndResize(height=height, width=width)
    if path.suffix == ".png":
        clip = [crop(Image.open(path).convert("RGB"))]
    else:
        resample = {} if fps is None else {"frame_rate": fps, "fix_frame_rate": True}
        clip = LoadVideo(num_frames=frames, frame_processor=crop, **resample)(str(path))
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.scheduler.training = True  # DiffSynth's training path: the unit returns the clean input_latents
    pipe.vae = reference_vae22(encoders / "Wan2.2_VAE.pth") if ti2v else reference_vae(encoders / "vae.pth")
    pipe.tokenizer = HuggingfaceTokenizer(name=str(encoders / "tokenizer"), seq_len=TEXT_LEN, clean="whitespace")
    pipe.text_encoder = WanTextEncoder(**text_encoder_config(pipe.tokenizer.vocab_size)).eval()
    pipe.text_encoder.load_state_dict(torch.load(encoders / "t5.pth", weights_only=True))
    with torch.no_grad():
        latents = WanVideoUnit_InputVideoEmbedder().process(
            pipe, input_video=clip, noise=None, tiled=False, tile_size=None, tile_stride=None, vace_reference_image=None,
            framewise_decoding=False, animate2_reference_image=None, animate2_reference_video=None)["input_latents"]
        context = WanVideoUnit_PromptEmbedder().encode_prompt(pipe, caption)
        tensors = {"latents": latents[0], "context": context[0]}
        if ti2v:
            # The unit reads one attribute of the DiT: TI2V-5B's config sets it.
            pipe.dit = SimpleNamespace(fuse_vae_embedding_in_latents=True)
            noise = torch.zeros_like(latents)
            fused = WanVideoUnit_ImageEmbedderFused().process(pipe, input_image=clip[0], latents=noise, height=height,
                                                              width=width, tiled=False, tile_size=None, tile_stride=None)
            tensors["first_frame_latents"] = fused["first_frame_latents"][0]
    return tensors


def test_prepare_matches_diffsynth_buckets_skips_and_resumes(videos, encoders, tmp_path, capsys):
    out = tmp_path / "data"
    rc, stdout, stderr = run_prepare(videos, encoders, out, capsys)
    assert rc == 0, stderr
    assert "3 prepared, 0 already" in stdout and "3 skipped" in stdout, stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in stderr, stderr
    assert any("broken.mp4: cannot decode video" in l for l in lines), stderr
    assert any("uncaptioned.mp4: no caption" in l for l in lines), stderr
    assert any("short.mp4: has 3 frames; the shortest frame bucket is 5" in l for l in lines), stderr

    expected = {  # file: (source, frames, height, width)
        "wide.mp4": (videos / "wide.mp4", 9, 32, 48),
        "more__tall.webm": (videos / "more" / "tall.webm", 5, 48, 32),
        "still.png": (videos / "still.png", 1, 32, 48),
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.safetensors" for k in expected)
    for name, (source, frames, height, width) in expected.items():
        sample = load_file(str(out / f"{name}.safetensors"))
        assert set(sample) == {"latents", "context"}
        assert sample["latents"].dtype == torch.float32 and sample["context"].dtype == torch.float32
        assert list(sample["latents"].shape) == [16, (frames - 1) // 4 + 1, height // 8, width // 8], name
        assert list(sample["context"].shape) == [TEXT_LEN, 64]
        caption = CAPTIONS[source.name]
        reference = diffsynth_reference(source, caption, frames, height, width, encoders)
        # Same float32 ops on the same pixels: only summation order may differ.
        torch.testing.assert_close(sample["latents"], reference["latents"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sample["context"], reference["context"], rtol=1e-4, atol=1e-5)
        n_tokens = len(caption.split()) + 1  # words + </s>
        assert sample["context"][n_tokens:].abs().max() == 0 and sample["context"][n_tokens - 1].abs().max() > 0
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["caption"] == caption and f.metadata()["bucket"] == f"{height}x{width}"

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, stdout, _ = run_prepare(videos, encoders, out, capsys)
    assert rc == 0 and "0 prepared, 3 already" in stdout, stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # The dataset, two latent sizes mixed, is read by flowstep itself.
    r = subprocess.run([str(flowstep_bin()), "-q", "eval", "--artifacts", str(TINY), "--data", str(out), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == 3


def test_prepare_wan22_vae_makes_ti2v_samples_as_diffsynth(videos, encoders, tmp_path, capsys):
    """The Wan2.2 VAE (TI2V-5B's): 48-channel latents at 16x and each clip's first_frame_latents,
    equal to DiffSynth's InputVideoEmbedder and ImageEmbedderFused units with its WanVideoVAE38;
    resolutions are multiples of 32 (16x times the DiT's patch 2); one-frame files are skipped
    (TI2V trains on the frames after the first); the dataset trains tiny-ti2v in `flowstep eval`."""
    out = tmp_path / "data"

    def run(resolution, frames="5,9"):
        rc = prepare_main(["--videos", str(videos), "--out", str(out), "--vae", str(encoders / "Wan2.2_VAE.pth"),
                           "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                           "--resolution", resolution, "--frames", frames, "--text-len", str(TEXT_LEN),
                           "--dtype", "f32", "--precision", "float32", "-q"])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    rc, _, err = run("32x48")
    assert rc == 1 and err.strip() == ("error: --resolution 32x48: height and width must be multiples of 32 (the VAE's "
                                       "compression times the DiT's patch 2) from 32 to 4096"), err
    rc, _, err = run("32x64", frames="1")
    assert rc == 1 and err.count("\n") == 1 and "--frames 1: TI2V (the Wan2.2 VAE) trains on the frames after the first" in err, err
    assert not out.exists() or not list(out.iterdir())

    rc, stdout, stderr = run("32x64,64x32")
    assert rc == 0, stderr
    assert "2 prepared, 0 already" in stdout and "4 skipped" in stdout, stdout
    assert any("still.png: one frame: TI2V (the Wan2.2 VAE) trains on the frames after the first; it needs a video of 5 "
               "frames or more" in line for line in stderr.splitlines()), stderr
    expected = {"wide.mp4": (videos / "wide.mp4", 9, 32, 64), "more__tall.webm": (videos / "more" / "tall.webm", 5, 64, 32)}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.safetensors" for k in expected)
    for name, (source, frames, height, width) in expected.items():
        sample = load_file(str(out / f"{name}.safetensors"))
        assert list(sample["latents"].shape) == [48, (frames - 1) // 4 + 1, height // 16, width // 16], name
        assert list(sample["first_frame_latents"].shape) == [48, 1, height // 16, width // 16], name
        reference = diffsynth_reference(source, CAPTIONS[source.name], frames, height, width, encoders, ti2v=True)
        assert set(sample) == set(reference) == {"latents", "context", "first_frame_latents"}
        # Same float32 ops on the same pixels: only summation order may differ (measured: 0 for
        # the latents, which run the same PyTorch ops).
        for key, atol in (("latents", 1e-4), ("first_frame_latents", 1e-4), ("context", 1e-5)):
            torch.testing.assert_close(sample[key], reference[key], rtol=1e-4, atol=atol, msg=f"{name} {key}")
        # A causal VAE's first latent frame sees frame 0 only: the condition is the video's own frame 0.
        torch.testing.assert_close(sample["first_frame_latents"], sample["latents"][:, :1], rtol=1e-4, atol=1e-4)

    ti2v = TINY.parent.parent / "tiny-ti2v" / "artifacts"
    r = subprocess.run([str(flowstep_bin()), "-q", "eval", "--artifacts", str(ti2v), "--data", str(out), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == 2


def test_prepare_records_settings_and_re_encodes_samples_made_with_others(videos, encoders, tmp_path, capsys):
    """Each sample carries the settings it was made with; a re-run with the same settings keeps
    it, one with another --text-len (or a sample with no recorded settings) re-encodes it."""
    d = tmp_path / "two"
    d.mkdir()
    for name in ("wide.mp4", "still.png"):
        shutil.copy(videos / name, d / name)
        (d / name).with_suffix(".txt").write_text(CAPTIONS[name])
    out = tmp_path / "data"

    def run(text_len, frames="9,5"):
        rc = prepare_main(["--videos", str(d), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                           "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                           "--resolution", "48x32,32x48", "--frames", frames, "--text-len", str(text_len),
                           "--dtype", "f32", "--precision", "float32", "-q"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        return captured.out, captured.err

    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    run(TEXT_LEN)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    stdout, stderr = run(TEXT_LEN)
    assert "0 prepared, 2 already in" in stdout and "re-encoded" not in stdout and stderr == "", (stdout, stderr)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    stdout, stderr = run(8)
    assert "2 prepared (2 re-encoded: 2 made with another --text-len), 0 already in" in stdout, stdout
    assert sorted(p.name for p in out.iterdir()) == ["still.png.safetensors", "wide.mp4.safetensors"]
    tokenizer_files = sorted(p for p in (encoders / "tokenizer").iterdir() if p.is_file())
    manifest = "".join(f"{sha256(p.read_bytes())}  {p.name}\n" for p in tokenizer_files)
    settings = {"resolutions": "32x48,48x32", "frame_buckets": "5,9", "fps": "source", "text_len": "8",
                "dtype": "f32", "vae_sha256": sha256((encoders / "vae.pth").read_bytes()),
                "text_encoder_sha256": sha256((encoders / "t5.pth").read_bytes()),
                "tokenizer_sha256": sha256(manifest.encode())}
    for p in out.iterdir():
        assert list(load_file(str(p))["context"].shape) == [8, 64], p.name
        with safe_open(str(p), "pt") as f:
            assert {k: f.metadata().get(k) for k in settings} == settings, p.name

    # A sample from an older prepare (no recorded settings) is re-encoded, with one line saying so.
    old = out / "wide.mp4.safetensors"
    save_file(load_file(str(old)), str(old), metadata={"caption": CAPTIONS["wide.mp4"], "bucket": "32x48"})
    stdout, stderr = run(8)
    assert "1 prepared (1 re-encoded: 1 with no recorded settings), 1 already in" in stdout, stdout
    assert len(stderr.strip().splitlines()) == 1 and "no recorded settings" in stderr, stderr
    with safe_open(str(old), "pt") as f:
        assert {k: f.metadata().get(k) for k in settings} == settings

    # A sample that cannot be read is made again too.
    old.write_bytes(b"not a safetensors file")
    stdout, _ = run(8)
    assert "1 prepared (1 re-encoded: 1 unreadable), 1 already in" in stdout, stdout
    assert list(load_file(str(old))["context"].shape) == [8, 64]

    # A stale sample whose file can no longer be prepared (11 frames, bucket 13) is not kept.
    stdout, stderr = run(8, frames="13")
    assert "1 prepared (1 re-encoded: 1 made with another --frames), 0 already in" in stdout and "1 skipped" in stdout
    assert "wide.mp4: has 11 frames" in stderr and "its old sample (made with another --frames) removed" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["still.png.safetensors"]

    # What is not a sample file where one should be stops the run (a FIFO would hang its read).
    (out / "wide.mp4.safetensors").mkdir()
    rc = prepare_main(["--videos", str(d), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       "--resolution", "32x48", "--frames", "5", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "wide.mp4.safetensors: is a directory" in err, err


def test_prepare_fps_resamples_as_diffsynth(videos, encoders, tmp_path, capsys):
    """--fps 4 on an 11-frame 8 fps video: 1.375 s holds 5 frames at 4 fps, source frames
    0, 2, 4, 6, 8, as DiffSynth's LoadVideo with fix_frame_rate."""
    d = tmp_path / "one"
    d.mkdir()
    (d / "wide.mp4").symlink_to(videos / "wide.mp4")
    (d / "wide.txt").write_text(CAPTIONS["wide.mp4"])
    out = tmp_path / "data"
    rc = prepare_main(["--videos", str(d), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       "--resolution", "32x48", "--frames", "5,9", "--fps", "4", "--text-len", str(TEXT_LEN),
                       "--dtype", "f32", "--precision", "float32", "-q"])
    assert rc == 0, capsys.readouterr().err
    latents = load_file(str(out / "wide.mp4.safetensors"))["latents"]
    reference = diffsynth_reference(videos / "wide.mp4", CAPTIONS["wide.mp4"], 5, 32, 48, encoders, fps=4)["latents"]
    assert list(latents.shape) == [16, 2, 4, 6]
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)


def test_prepare_bf16_default_and_metadata_csv(videos, encoders, tmp_path, capsys):
    """DiffSynth's metadata.csv names the files and prompts; the default stored dtype is bf16."""
    d = tmp_path / "csv"
    d.mkdir()
    write_video(d / "clip.mp4", frames=5, height=32, width=48)
    (d / "metadata.csv").write_text('video,prompt\nclip.mp4,"a ball, rolling"\nmissing.mp4,gone\n')
    out = tmp_path / "data"
    rc = prepare_main(["--videos", str(d), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       "--resolution", "32x48", "--frames", "5", "--text-len", str(TEXT_LEN), "-q"])
    captured = capsys.readouterr()
    assert rc == 0 and "1 prepared" in captured.out and "1 skipped" in captured.out, captured
    assert "missing.mp4: no such file" in captured.err
    sample = load_file(str(out / "clip.mp4.safetensors"))
    assert sample["latents"].dtype == torch.bfloat16 and list(sample["latents"].shape) == [16, 2, 4, 6]
    with safe_open(str(out / "clip.mp4.safetensors"), "pt") as f:
        assert f.metadata()["caption"] == "a ball, rolling"


@pytest.mark.parametrize("flag, value, message", [
    ("--resolution", "30x48", "multiples of 16"),
    ("--frames", "8", "must be 4k+1"),
])
def test_prepare_refuses_bad_buckets(videos, encoders, tmp_path, capsys, flag, value, message):
    args = {"--resolution": "32x48", "--frames": "5", flag: value}
    rc = prepare_main(["--videos", str(videos), "--out", str(tmp_path / "o"), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_module_is_one_line(videos, encoders, tmp_path, capsys, monkeypatch):
    """A module that is not installed is named in one line. (The DiffSynth cache converter no
    longer needs PIL for the images its .pth files hold: they load as stand-ins, see
    test_hostile_tools.)"""
    prepare_args = ["--videos", str(videos), "--out", str(tmp_path / "p"), "--vae", str(encoders / "vae.pth"),
                    "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                    "--resolution", "32x48", "--frames", "5", "--text-len", str(TEXT_LEN), "-q"]
    with monkeypatch.context() as m:
        for name in ("imageio", "imageio.v2"):  # as if not installed: importing it raises ModuleNotFoundError
            m.setitem(sys.modules, name, None)
        assert prepare_main(prepare_args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`imageio`" in err and "requirements.txt" in err, err


def test_encode_prompts_matches_the_prepared_context(encoders, tmp_path, capsys):
    """Context files for `flowstep sample --context` hold what prepare stores for the same caption
    (checked against DiffSynth's prompt embedder above)."""
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
    from diffsynth.pipelines.wan_video import WanVideoPipeline, WanVideoUnit_PromptEmbedder

    from flowstep_export.data.encode_prompts import main as encode_main

    prompts = [CAPTIONS["wide.mp4"], "the green square"]
    assert encode_main([*prompts, "--out", str(tmp_path / "p"), "--text-encoder", str(encoders / "t5.pth"),
                        "--tokenizer", str(encoders / "tokenizer"), "--text-len", str(TEXT_LEN), "--precision", "float32"]) == 0
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.tokenizer = HuggingfaceTokenizer(name=str(encoders / "tokenizer"), seq_len=TEXT_LEN, clean="whitespace")
    pipe.text_encoder = WanTextEncoder(**text_encoder_config(pipe.tokenizer.vocab_size)).eval()
    pipe.text_encoder.load_state_dict(torch.load(encoders / "t5.pth", weights_only=True))
    for i, prompt in enumerate(prompts):
        context = load_file(str(tmp_path / "p" / f"prompt-{i:03}.safetensors"))["context"]
        with torch.no_grad():
            reference = WanVideoUnit_PromptEmbedder().encode_prompt(pipe, prompt)[0]
        assert context.dtype == torch.float32 and list(context.shape) == [TEXT_LEN, 64]
        torch.testing.assert_close(context, reference, rtol=1e-4, atol=1e-5)
    assert encode_main(["--out", str(tmp_path / "q"), "--text-encoder", str(encoders / "t5.pth"),
                        "--tokenizer", str(encoders / "tokenizer")]) == 1
    assert "no prompts" in capsys.readouterr().err


def test_hugging_face_umt5_names_load(encoders, tmp_path):
    """ComfyUI's umt5_xxl_fp16.safetensors keeps Hugging Face's UMT5 names: renamed to Wan's, it
    gives what transformers' own UMT5EncoderModel computes (an independent implementation)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from flowstep_export.data.encode_prompts import main as encode_main

    tokenizer = AutoTokenizer.from_pretrained(str(encoders / "tokenizer"))
    torch.manual_seed(5)
    hf = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")).eval()
    save_file({k: v.clone().contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "umt5.safetensors"))
    prompt = "blue square over the green sky"
    assert encode_main([prompt, "--out", str(tmp_path / "p"), "--text-encoder", str(tmp_path / "umt5.safetensors"),
                        "--tokenizer", str(encoders / "tokenizer"), "--text-len", str(TEXT_LEN), "--precision", "float32"]) == 0
    context = load_file(str(tmp_path / "p" / "prompt-000.safetensors"))["context"]
    ids = tokenizer(prompt, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    with torch.no_grad():
        reference = hf(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
    n = int(ids.attention_mask.sum())
    torch.testing.assert_close(context[:n], reference[:n], rtol=1e-4, atol=1e-5)
    assert context[n:].abs().max() == 0
