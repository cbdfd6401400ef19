"""Issue 12's whole path on a clean checkout: short generated videos are prepared into a
two-bucket dataset with random tiny Wan encoders (DiffSynth's classes), `flowstep train` trains
the tiny DiT on it with samples during training, and the samples are decoded to frames by the
exported VAE decoder. The same for TI2V (issue 23): the Wan2.2 VAE's latents and first-frame
condition, tiny-ti2v, and `flowstep sample --condition --vae-decoder`; and for image-to-video
(tiny Wan2.1 I2V: `y` and CLIP features); and for both experts of the Wan2.2 A14B pair in one
job, sampled with the pair."""

import json
import subprocess

import imageio.v2 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowstep_export.data.encode_prompts import main as encode_prompts
from flowstep_export.data.prepare import main as prepare
from flowstep_export.pipeline.text_encoder import main as export_text_encoder
from independent import TINY, flowstep_bin
from wan_fixtures import TEXT_LEN, write_image_encoder, write_text_encoder, write_tokenizer, write_video


@pytest.fixture(scope="module")
def t2v_clips(vae_decoder, tmp_path_factory):
    """Generated clips in two buckets prepared with the random tiny Wan2.1 VAE and text encoder,
    and one encoded prompt: shared by the single-model and the A14B pair runs."""
    tmp_path = tmp_path_factory.mktemp("t2v-clips")
    vocab = write_tokenizer(tmp_path / "tokenizer")
    write_text_encoder(tmp_path / "t5.pth", vocab)
    text = ["--text-encoder", str(tmp_path / "t5.pth"), "--tokenizer", str(tmp_path / "tokenizer"), "--text-len", str(TEXT_LEN)]
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"wide{i}.mp4", frames=10 + i, height=40, width=56)  # -> 32x48, 9 frames
        (videos / f"wide{i}.txt").write_text("a red ball rolls left\n")
        write_video(videos / f"tall{i}.mp4", frames=6, height=56, width=40)  # -> 48x32, 5 frames
        (videos / f"tall{i}.txt").write_text("blue square over the green sky\n")
    data = tmp_path / "data"
    assert prepare(["--videos", str(videos), "--out", str(data), "--vae", str(vae_decoder / "wan_2.1_vae.safetensors"), *text,
                    "--resolution", "32x48,48x32", "--frames", "5,9", "--dtype", "f32", "--precision", "float32", "-q"]) == 0
    assert len(list(data.glob("*.safetensors"))) == 4

    prompts = tmp_path / "prompts"
    assert encode_prompts(["--out", str(prompts), *text, "--precision", "float32", "a red ball rolls left"]) == 0
    (prompts / "prompts.txt").write_text("prompt-000.safetensors seed=3 steps=3\n")
    return data, prompts


def test_videos_to_lora_and_back_to_videos(t2v_clips, vae_decoder, tmp_path):
    data, prompts = t2v_clips
    out = tmp_path / "run"
    r = subprocess.run([str(flowstep_bin()), "train", "--artifacts", str(TINY), "--data", str(data), "--out", str(out),
                        "--steps", "4", "--seed", "1", "--lr", "1e-3", "--sample-every", "2",
                        "--sample-prompts", str(prompts / "prompts.txt"), "--vae-decoder", str(vae_decoder / "decoder")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["buckets"] == [{"latent_shape": [16, 3, 4, 6], "samples": 2}, {"latent_shape": [16, 2, 6, 4], "samples": 2}]
    assert [p.split("/")[-1] for p in summary["samples"]] == ["step-000002", "step-000004"]
    assert (out / "lora.safetensors").is_file()

    early, late = (out / "samples" / step / "00-a-red-ball-rolls-left" for step in ("step-000002", "step-000004"))
    for folder in (early, late):
        # The largest bucket's shape by default: 3 latent frames of 4x6 -> 9 RGB frames of 32x48.
        gif = iio.mimread(folder / "videos.gif")
        assert len(gif) == 9 and gif[0].shape[:2] == (32, 48)
        assert Image.open(folder / "videos.png").size[1] == 32
        assert (folder / "samples.safetensors").is_file()
    assert not np.array_equal(iio.mimread(early / "videos.gif")[4], iio.mimread(late / "videos.gif")[4]), "the LoRA moved between the two sample sets"


def test_a14b_pair_videos_to_loras_and_back_to_videos(t2v_clips, vae_decoder, tmp_path):
    """The same clips train both experts of the tiny Wan2.2 A14B pair in one job (two steps
    each), and `flowstep sample` with the pair and both LoRAs decodes to frames."""
    data, prompts = t2v_clips
    pair = TINY.parent.parent / "tiny-a14b"
    high, low = pair / "high_noise" / "artifacts", pair / "low_noise" / "artifacts"
    out = tmp_path / "run"
    r = subprocess.run([str(flowstep_bin()), "train", "--artifacts", str(high), "--expert-artifacts", str(low), "--data", str(data),
                        "--out", str(out), "--steps", "4", "--switch-expert-every", "2", "--seed", "1", "--lr", "1e-3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    experts = json.loads((out / "summary.json").read_text())["experts"]
    assert [(e["role"], e["steps"]) for e in experts] == [("high_noise", 2), ("low_noise", 2)]

    def sample(folder, *extra):
        r = subprocess.run([str(flowstep_bin()), "sample", "--artifacts", str(high), "--expert-artifacts", str(low),
                            "--lora", str(out / "lora_high_noise.safetensors"), "--context", str(prompts / "prompt-000.safetensors"),
                            "--shape", "3,4,6", "--num-samples", "1", "--steps", "3", "--cfg-scale", "1", "--seed", "3",
                            "--out", str(folder), *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return load_file(str(folder / "samples.safetensors"))["latents"]

    both = sample(tmp_path / "pair", "--expert-lora", str(out / "lora_low_noise.safetensors"), "--vae-decoder", str(vae_decoder / "decoder"))
    gif = iio.mimread(tmp_path / "pair" / "videos.gif")
    assert len(gif) == 9 and gif[0].shape[:2] == (32, 48)
    # 3 steps at shift 5 are t = 1000, 909 (high noise, ≥ 875) and 714 (low noise): the
    # low-noise expert's LoRA changes the last step.
    high_only = sample(tmp_path / "high-only")
    assert (both - high_only).abs().max() > 1e-4


def test_ti2v_videos_to_lora_and_back_to_videos(vae22_decoder, tmp_path):
    vocab = write_tokenizer(tmp_path / "tokenizer")
    write_text_encoder(tmp_path / "t5.pth", vocab)
    text = ["--text-encoder", str(tmp_path / "t5.pth"), "--tokenizer", str(tmp_path / "tokenizer"), "--text-len", str(TEXT_LEN)]
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"wide{i}.mp4", frames=10 + i, height=40, width=72)  # -> 32x64, 9 frames
        (videos / f"wide{i}.txt").write_text("a red ball rolls left\n")
    data = tmp_path / "data"
    assert prepare(["--videos", str(videos), "--out", str(data), "--vae", str(vae22_decoder / "Wan2.2_VAE.pth"), *text,
                    "--resolution", "32x64", "--frames", "5,9", "--dtype", "f32", "--precision", "float32", "-q"]) == 0
    condition = data / "wide0.mp4.safetensors"
    assert list(load_file(str(condition))["first_frame_latents"].shape) == [48, 1, 2, 4]

    prompts = tmp_path / "prompts"
    assert encode_prompts(["--out", str(prompts), *text, "--precision", "float32", "a red ball rolls left"]) == 0
    (prompts / "prompts.txt").write_text(f"prompt-000.safetensors seed=3 steps=3 condition={condition}\n")
    ti2v = TINY.parent.parent / "tiny-ti2v" / "artifacts"
    out = tmp_path / "run"
    r = subprocess.run([str(flowstep_bin()), "train", "--artifacts", str(ti2v), "--data", str(data), "--out", str(out),
                        "--steps", "4", "--seed", "1", "--lr", "1e-3", "--sample-every", "2",
                        "--sample-prompts", str(prompts / "prompts.txt"), "--vae-decoder", str(vae22_decoder / "decoder")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["buckets"] == [{"latent_shape": [48, 3, 2, 4], "samples": 2}]
    for step in ("step-000002", "step-000004"):
        gif = iio.mimread(out / "samples" / step / "00-a-red-ball-rolls-left" / "videos.gif")
        assert len(gif) == 9 and gif[0].shape[:2] == (32, 64)

    # The trained LoRA, sampled from the prepared clip's first frame and decoded to frames.
    video = tmp_path / "video"
    r = subprocess.run([str(flowstep_bin()), "sample", "--artifacts", str(ti2v), "--lora", str(out / "lora.safetensors"),
                        "--context", str(prompts / "prompt-000.safetensors"), "--condition", str(condition),
                        "--shape", "3,2,4", "--num-samples", "2", "--steps", "3", "--out", str(video),
                        "--vae-decoder", str(vae22_decoder / "decoder"), "--save-frames"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    frames = load_file(str(video / "videos.safetensors"))["frames"]
    assert list(frames.shape) == [2, 3, 9, 32, 64] and frames.std() > 0.05
    # Frame 0 is the clip's first frame through the VAE and back, whatever the seed; the rest is sampled.
    assert torch.equal(frames[0, :, 0], frames[1, :, 0]) and (frames[0, :, 1:] - frames[1, :, 1:]).abs().max() > 0.05
    assert len(iio.mimread(video / "videos.gif")) == 9


def test_i2v_videos_to_lora_and_back_to_videos(vae_decoder, tiny_i2v, tmp_path):
    """prepare --model tiny-i2v --clip, flowstep train with samples during training conditioned on
    a prepared sample's `y` and `clip_feature`, then flowstep sample --condition --vae-decoder."""
    vocab = write_tokenizer(tmp_path / "tokenizer")
    write_text_encoder(tmp_path / "t5.pth", vocab)
    write_image_encoder(tmp_path / "clip.pth")
    text = ["--text-encoder", str(tmp_path / "t5.pth"), "--tokenizer", str(tmp_path / "tokenizer"), "--text-len", str(TEXT_LEN)]
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"wide{i}.mp4", frames=9 + i, height=40, width=56)  # -> 32x48, 9 frames
        (videos / f"wide{i}.txt").write_text("a red ball rolls left\n")
    data = tmp_path / "data"
    assert prepare(["--videos", str(videos), "--out", str(data), "--vae", str(vae_decoder / "wan_2.1_vae.safetensors"),
                    *text, "--model", "tiny-i2v", "--clip", str(tmp_path / "clip.pth"), "--resolution", "32x48",
                    "--frames", "9", "--dtype", "f32", "--precision", "float32", "-q"]) == 0

    prompts = tmp_path / "prompts"
    assert encode_prompts(["--out", str(prompts), *text, "--precision", "float32", "a red ball rolls left"]) == 0
    assert export_text_encoder([*text, "--out", str(tmp_path / "umt5")]) == 0
    condition = data / "wide0.mp4.safetensors"  # a prepared sample holds the `y` and `clip_feature` sampling takes
    # The same prompt twice: as a context file, and as text with its conditioning file (`--c`,
    # where musubi-tuner's lines take an image path, `--i`, refused with the way to make one).
    (prompts / "prompts.txt").write_text(f"prompt-000.safetensors seed=3 steps=3 condition={condition}\n"
                                         f"a red ball rolls left --d 3 --s 3 --g 1 --c {condition}\n")
    out = tmp_path / "run"
    train = [str(flowstep_bin()), "train", "--artifacts", str(tiny_i2v), "--data", str(data), "--out", str(out),
             "--steps", "4", "--seed", "1", "--lr", "1e-3", "--sample-every", "4", "--lora-dtype", "f32",
             "--sample-prompts", str(prompts / "prompts.txt"), "--text-encoder", str(tmp_path / "umt5"),
             "--vae-decoder", str(vae_decoder / "decoder")]
    (prompts / "musubi.txt").write_text("a red ball rolls left --i first.png --d 3\n")
    r = subprocess.run([*train[:-6], "--sample-prompts", str(prompts / "musubi.txt"), *train[-4:]], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "`--i`: musubi-tuner's image path is not read here" in r.stderr and "encode_image" in r.stderr, r.stderr
    (prompts / "bare.txt").write_text("a red ball rolls left --d 3\n")
    r = subprocess.run([*train[:-6], "--sample-prompts", str(prompts / "bare.txt"), *train[-4:]], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "needs image conditioning: add `--c FILE`" in r.stderr, r.stderr
    r = subprocess.run(train, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    from_text = load_file(str(out / "samples" / "step-000004" / "01-a-red-ball-rolls-left" / "samples.safetensors"))["latents"]
    from_file = load_file(str(out / "samples" / "step-000004" / "00-a-red-ball-rolls-left" / "samples.safetensors"))["latents"]
    # Same seed, steps and conditioning; contexts equal within the text encoder's 1e-5.
    assert torch.allclose(from_text, from_file, atol=1e-4), (from_text - from_file).abs().max()
    assert json.loads((out / "summary.json").read_text())["buckets"] == [{"latent_shape": [16, 3, 4, 6], "samples": 2}]
    during = out / "samples" / "step-000004" / "00-a-red-ball-rolls-left"
    gif = iio.mimread(during / "videos.gif")
    assert len(gif) == 9 and gif[0].shape[:2] == (32, 48)

    after = tmp_path / "sample"
    r = subprocess.run([str(flowstep_bin()), "sample", "--artifacts", str(tiny_i2v), "--lora", str(out / "lora.safetensors"),
                        "--context", str(prompts / "prompt-000.safetensors"), "--condition", str(condition),
                        "--shape", "3,4,6", "--num-samples", "1", "--steps", "3", "--cfg-scale", "1", "--seed", "3", "--vae-decoder", str(vae_decoder / "decoder"),
                        "--out", str(after)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(iio.mimread(after / "videos.gif")) == 9
    # flowstep sample with the same seed, steps, LoRA (saved in float32) and condition draws what
    # the run drew at its last step.
    drawn, again = (load_file(str(d / "samples.safetensors"))["latents"] for d in (during, after))
    assert torch.allclose(drawn, again, atol=1e-5), (drawn - again).abs().max()
