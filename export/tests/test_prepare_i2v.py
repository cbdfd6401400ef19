"""`prepare --model` for image-to-video DiTs: each sample's `y` and `clip_feature` equal
DiffSynth's own pipeline units (WanVideoUnit_ImageEmbedderVAE, WanVideoUnit_ImageEmbedderCLIP)
given the input image its trainer passes (the clip's first frame, `--extra_inputs input_image`)
or the image beside the video, with random tiny encoders; bad combinations are one line."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from flowstep_export.data.encode_image import main as encode_image
from flowstep_export.data.prepare import main as prepare_main
from wan_fixtures import (TEXT_LEN, reference_image_encoder, reference_vae, write_image_encoder, write_video)


@pytest.fixture(scope="module")
def clip_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    write_image_encoder(path)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("i2v-videos")
    write_video(d / "wide.mp4", frames=11, height=40, width=56)  # 32x48 bucket, 9 frames
    write_video(d / "given.mp4", frames=6, height=56, width=40)  # 48x32, 5 frames, with its own input image
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(60, 44, 3) * 255).astype(np.uint8)).save(d / "given.png")
    Image.fromarray((rng.rand(30, 44, 3) * 255).astype(np.uint8)).save(d / "still.jpg")  # a sample of one frame
    for name, caption in {"wide": "a red ball rolls left", "given": "blue square over the green sky",
                          "still": "the night sky"}.items():
        (d / f"{name}.txt").write_text(caption)
    return d


def run(videos, encoders, out, capsys, *extra):
    rc = prepare_main(["--videos", str(videos), "--out", str(out), "--vae", str(encoders / "vae.pth"),
                       "--text-encoder", str(encoders / "t5.pth"), "--tokenizer", str(encoders / "tokenizer"),
                       "--resolution", "32x48,48x32", "--frames", "5,9", "--text-len", str(TEXT_LEN),
                       "--dtype", "f32", "--precision", "float32", "-q", *map(str, extra)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def diffsynth_units(input_image, frames, height, width, encoders, clip_path, end_image=None):
    """DiffSynth's WanVideoUnit_ImageEmbedderVAE and, with `clip_path`, WanVideoUnit_ImageEmbedderCLIP
    on a PIL input image (and end image, FLF2V), as its training pipeline runs them (float32 here)."""
    from diffsynth.pipelines.wan_video import (WanVideoPipeline, WanVideoUnit_ImageEmbedderCLIP,
                                               WanVideoUnit_ImageEmbedderVAE)

    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.vae = reference_vae(encoders / "vae.pth")
    pipe.image_encoder = None if clip_path is None else reference_image_encoder(clip_path)
    # The DiT flags these units read: Wan2.1 I2V's (Wan2.2 I2V-A14B has require_clip_embedding False).
    pipe.dit = SimpleNamespace(require_vae_embedding=True, require_clip_embedding=clip_path is not None,
                               has_image_pos_emb=False)
    with torch.no_grad():
        out = WanVideoUnit_ImageEmbedderVAE().process(pipe, input_image=input_image, end_image=end_image, num_frames=frames,
                                                      height=height, width=width, tiled=False, tile_size=None,
                                                      tile_stride=None)
        out |= WanVideoUnit_ImageEmbedderCLIP().process(pipe, input_image=input_image, end_image=end_image, height=height,
                                                        width=width)
    return {name: t[0] for name, t in out.items()}


def diffsynth_input_image(path, frames, height, width):
    """The input image DiffSynth's trainer passes: its loader's first frame of the clip, or the
    image loaded and cropped by its ImageCropAndResize."""
    from diffsynth.core.data.operators import ImageCropAndResize

    if path.suffix in (".png", ".jpg"):
        return ImageCropAndResize(height=height, width=width)(Image.open(path).convert("RGB"))
    return diffsynth_video(path, frames, height, width)[0]


def diffsynth_video(path, frames, height, width):
    """The clip's frames as DiffSynth's loader gives them to its trainer."""
    from diffsynth.core.data.operators import ImageCropAndResize, LoadVideo

    return LoadVideo(num_frames=frames, frame_processor=ImageCropAndResize(height=height, width=width))(str(path))


@pytest.mark.parametrize("model", ["tiny-i2v", "tiny-i2v-a14b"])
def test_i2v_conditioning_matches_diffsynth_units(videos, encoders, clip_encoder, tmp_path, capsys, model):
    with_clip = model == "tiny-i2v"
    out = tmp_path / "data"
    rc, stdout, stderr = run(videos, encoders, out, capsys, "--model", model, *(["--clip", clip_encoder] if with_clip else []))
    assert rc == 0 and "3 prepared" in stdout and "0 skipped" in stdout, (stdout, stderr)
    # given.png is given.mp4's input image, not a sample of its own.
    assert sorted(p.name for p in out.iterdir()) == ["given.mp4.safetensors", "still.jpg.safetensors", "wide.mp4.safetensors"]
    expected = {"wide.mp4": (videos / "wide.mp4", 9, 32, 48), "given.mp4": (videos / "given.png", 5, 48, 32),
                "still.jpg": (videos / "still.jpg", 1, 32, 48)}
    for name, (image, frames, height, width) in expected.items():
        sample = load_file(str(out / f"{name}.safetensors"))
        assert set(sample) == {"latents", "context", "y", *(["clip_feature"] if with_clip else [])}, name
        latent_frames = (frames - 1) // 4 + 1
        assert list(sample["y"].shape) == [20, latent_frames, height // 8, width // 8]
        reference = diffsynth_units(diffsynth_input_image(image, frames, height, width), frames, height, width, encoders,
                                    clip_encoder if with_clip else None)
        assert set(reference) == set(sample) - {"latents", "context"}
        # The same float32 ops on the same pixels: only summation order may differ (measured: 0).
        torch.testing.assert_close(sample["y"], reference["y"], rtol=1e-5, atol=1e-5)
        assert sample["y"][:4, 0].min() == 1 and sample["y"][:4, 1:].abs().sum() == 0, "the first-frame mask"
        if with_clip:
            assert list(sample["clip_feature"].shape) == [257, 1280]
            torch.testing.assert_close(sample["clip_feature"], reference["clip_feature"], rtol=1e-5, atol=1e-5)
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["conditioning"] == ("y,clip_feature" if with_clip else "y")
        assert meta["input_image"] == ("given.png" if name == "given.mp4" else "first frame")
    # encode_image makes the same tensors from the same image for sampling (flowstep sample --condition).
    condition = tmp_path / "given.safetensors"
    assert encode_image(["--image", str(videos / "given.png"), "--out", str(condition), "--model", model,
                         "--vae", str(encoders / "vae.pth"), *(["--clip", str(clip_encoder)] if with_clip else []),
                         "--resolution", "48x32", "--frames", "5", "--precision", "float32"]) == 0
    given = load_file(str(out / "given.mp4.safetensors"))
    encoded = load_file(str(condition))
    assert set(encoded) == set(given) - {"latents", "context"}
    for name, t in encoded.items():
        torch.testing.assert_close(t, given[name], rtol=0, atol=0)
    # For a video, the first frame's latents are y's image part only when the input image is that frame.
    wide = load_file(str(out / "wide.mp4.safetensors"))
    assert (wide["y"][4:, 0] - wide["latents"][:, 0]).abs().max() < 1e-5


def test_flf2v_y_matches_diffsynth_unit(videos, encoders, clip_encoder, tmp_path, capsys):
    """--last-frame: `y` as DiffSynth's unit makes it given end_image, which its trainer takes
    from the clip's last frame (`--extra_inputs input_image,end_image`); CLIP features stay the
    first image's, as DiffSynth's for a DiT without image position embeddings. encode_image
    --last-image makes the same from two image files for sampling."""
    out = tmp_path / "data"
    rc, stdout, stderr = run(videos, encoders, out, capsys, "--model", "tiny-i2v", "--clip", clip_encoder, "--last-frame")
    assert rc == 0 and "2 prepared" in stdout and "1 skipped" in stdout, (stdout, stderr)
    assert "skipped" in stderr and "still.jpg: one frame: --last-frame (FLF2V) needs a first and a last frame" in stderr, stderr
    for name, image, frames, height, width in [("wide.mp4", videos / "wide.mp4", 9, 32, 48), ("given.mp4", videos / "given.png", 5, 48, 32)]:
        sample = load_file(str(out / f"{name}.safetensors"))
        end_image = diffsynth_video(videos / name, frames, height, width)[-1]  # the trainer's data["video"][-1]
        reference = diffsynth_units(diffsynth_input_image(image, frames, height, width), frames, height, width, encoders,
                                    clip_encoder, end_image=end_image)
        torch.testing.assert_close(sample["y"], reference["y"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sample["clip_feature"], reference["clip_feature"], rtol=1e-5, atol=1e-5)
        # The mask marks frame 0 (channels 0-3 of latent frame 0) and frame T-1 (channel 3 of the last).
        mask = sample["y"][:4].flatten(2).amax(-1)
        want = torch.zeros_like(mask)
        want[:, 0] = 1
        want[3, -1] = 1
        assert torch.equal(mask, want), mask
    # encode_image --last-image: a start and an end image for sampling, as DiffSynth's unit takes them.
    condition = tmp_path / "flf.safetensors"
    assert encode_image(["--image", str(videos / "given.png"), "--last-image", str(videos / "still.jpg"), "--out", str(condition),
                         "--model", "tiny-i2v", "--vae", str(encoders / "vae.pth"), "--clip", str(clip_encoder),
                         "--resolution", "48x32", "--frames", "5", "--precision", "float32"]) == 0
    crop = [diffsynth_input_image(videos / name, 5, 48, 32) for name in ("given.png", "still.jpg")]
    reference = diffsynth_units(crop[0], 5, 48, 32, encoders, clip_encoder, end_image=crop[1])
    encoded = load_file(str(condition))
    for name in ("y", "clip_feature"):
        torch.testing.assert_close(encoded[name], reference[name], rtol=1e-5, atol=1e-5)
    # Without --last-frame the same samples are made again, and the flag is named.
    rc, stdout, _ = run(videos, encoders, out, capsys, "--model", "tiny-i2v", "--clip", clip_encoder)
    assert rc == 0 and "2 made with another --last-frame" in stdout, stdout
    rc, _, stderr = run(videos, encoders, tmp_path / "refused", capsys, "--last-frame")
    assert rc == 1 and len(stderr.strip().splitlines()) == 1 and "--last-frame: FLF2V needs an image-to-video --model" in stderr, stderr


def test_i2v_settings_re_encode_and_one_line_errors(videos, encoders, clip_encoder, tmp_path, capsys):
    """A text-to-video dataset prepared again for an I2V model is re-encoded, and the samples say
    so; flags that do not fit the model are one line each, before any encoding."""
    d = tmp_path / "one"
    d.mkdir()
    shutil.copy(videos / "wide.mp4", d / "wide.mp4")
    (d / "wide.txt").write_text("a red ball rolls left")
    out = tmp_path / "data"
    assert run(d, encoders, out, capsys)[0] == 0
    assert set(load_file(str(out / "wide.mp4.safetensors"))) == {"latents", "context"}
    rc, stdout, _ = run(d, encoders, out, capsys, "--model", "tiny-i2v-a14b")
    assert rc == 0 and "1 prepared (1 re-encoded: 1 made with another --model)" in stdout, stdout
    assert "y" in load_file(str(out / "wide.mp4.safetensors"))
    rc, stdout, _ = run(d, encoders, out, capsys, "--model", "tiny-i2v-a14b")
    assert rc == 0 and "0 prepared, 1 already" in stdout, stdout
    shutil.copy(videos / "given.png", d / "wide.png")  # an input image now given: made again from it
    rc, stdout, _ = run(d, encoders, out, capsys, "--model", "tiny-i2v-a14b")
    assert rc == 0 and "1 prepared (1 re-encoded: 1 made with another input image)" in stdout, stdout

    flat = tmp_path / "flat_clip.pth"
    torch.save({"visual.patch_embedding.weight": torch.zeros(3), "visual.pos_embedding": torch.zeros(1, 5, 3)}, flat)
    for extra, message in [
        (["--model", "tiny-i2v"], "--model tiny-i2v takes CLIP image features: give --clip"),
        (["--model", "tiny-i2v", "--clip", flat], "not Wan's CLIP image encoder (visual.patch_embedding.weight has shape [3]"),
        (["--model", "tiny-i2v-a14b", "--clip", clip_encoder], "--model tiny-i2v-a14b takes no CLIP image features"),
        (["--clip", clip_encoder], "text-to-video (no --model) takes no CLIP image features"),
        (["--model", "tiny-ti2v"], "--model tiny-ti2v: TI2V takes no --model; its first_frame_latents come from the Wan2.2 VAE"),
        (["--model", "wan2.1-i2v-14b", "--clip", clip_encoder], f"--text-len {TEXT_LEN}: --model wan2.1-i2v-14b takes 512"),
        (["--model", "tiny-i2v", "--clip", encoders / "vae.pth"], "not Wan's CLIP image encoder (no tensor `visual.patch_embedding.weight`"),
        (["--model", "tiny-i2v", "--clip", tmp_path], "is a directory"),
    ]:
        rc, _, stderr = run(d, encoders, tmp_path / "refused", capsys, *extra)
        assert rc == 1 and len(stderr.strip().splitlines()) == 1 and message in stderr, (extra, stderr)
    # I2V's y holds Wan2.1 VAE latents: the Wan2.2 VAE (TI2V-5B's) is refused before any work.
    rc, _, stderr = run(d, encoders, tmp_path / "refused", capsys, "--model", "tiny-i2v-a14b", "--vae", encoders / "Wan2.2_VAE.pth")
    assert rc == 1 and len(stderr.strip().splitlines()) == 1 and "the Wan2.2 VAE is TI2V-5B's" in stderr, stderr


def test_metadata_csv_input_image_column(videos, encoders, tmp_path, capsys):
    """DiffSynth's metadata.csv with an `input_image` column: the named image is the clip's input
    image, an empty cell means the first frame, a missing file skips the clip with one line, and a
    path outside --videos stops the run."""
    d = tmp_path / "csv"
    d.mkdir()
    for name in ("wide.mp4", "given.mp4", "given.png"):
        shutil.copy(videos / name, d / name)
    shutil.copy(videos / "wide.mp4", d / "lost.mp4")
    (d / "metadata.csv").write_text("video,prompt,input_image\nwide.mp4,a red ball,given.png\ngiven.mp4,the sky,\n"
                                    "lost.mp4,a ball,gone.png\n")
    out = tmp_path / "data"
    rc, stdout, stderr = run(d, encoders, out, capsys, "--model", "tiny-i2v-a14b")
    assert rc == 0 and "2 prepared" in stdout and "1 skipped" in stdout, (stdout, stderr)
    assert "lost.mp4: input image" in stderr and "gone.png: no such file" in stderr and len(stderr.strip().splitlines()) == 1
    wide = load_file(str(out / "wide.mp4.safetensors"))
    reference = diffsynth_units(diffsynth_input_image(d / "given.png", 9, 32, 48), 9, 32, 48, encoders, None)
    torch.testing.assert_close(wide["y"], reference["y"], rtol=1e-5, atol=1e-5)
    with safe_open(str(out / "given.mp4.safetensors"), "pt") as f:
        assert f.metadata()["input_image"] == "first frame"

    (d / "metadata.csv").write_text("video,prompt,input_image\nwide.mp4,a red ball,../given.png\n")
    rc, _, stderr = run(d, encoders, out, capsys, "--model", "tiny-i2v-a14b")
    assert rc == 1 and "row 1, input_image: `../given.png` is outside --videos" in stderr, stderr


@pytest.mark.parametrize("change, message", [
    ({"--model": "tiny"}, "--model tiny: a text-to-video model takes no image"),
    ({"--model": "tiny-i2v"}, "--model tiny-i2v takes CLIP image features: give --clip"),
    ({"--resolution": "48x32,32x48"}, "give one size and one frame count"),
    ({"--frames": "6"}, "--frames 6: must be 4k+1"),
    ({"--image": "missing.png"}, "--image missing.png: no such file"),
    ({"--last-image": "missing.png"}, "--last-image missing.png: no such file"),
    ({"--last-image": "missing.png", "--frames": "1"}, "FLF2V needs a first and a last frame; give --frames 5 or more"),
])
def test_encode_image_refuses_with_one_line(encoders, videos, tmp_path, capsys, change, message):
    flags = {"--image": str(videos / "given.png"), "--out": str(tmp_path / "c.safetensors"), "--model": "tiny-i2v-a14b",
             "--vae": str(encoders / "vae.pth"), "--resolution": "48x32", "--frames": "5"} | change
    assert encode_image([x for kv in flags.items() for x in kv]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "c.safetensors").exists()
