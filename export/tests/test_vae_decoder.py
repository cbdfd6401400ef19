"""Wan's VAE decoders exported to ONNX and run by `flowstep sample --vae-decoder`: the decoded
frames equal DiffSynth's `WanVideoVAE.decode` (Wan2.1) and `WanVideoVAE38.decode` (Wan2.2, for
TI2V-5B) of the same latents with the same random weights, and the contact sheet, GIF and MP4
hold those frames."""

import json
import os
import shutil
import subprocess

import imageio.v2 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from independent import TINY, flowstep_bin
from wan_fixtures import reference_vae, reference_vae22

PROMPT = TINY.parent.parent / "toy" / "prompts" / "yellow-up.safetensors"  # a [16, 64] context
TINY_TI2V = TINY.parent.parent / "tiny-ti2v" / "artifacts"  # 48 latent channels, text [16, 64]
# float32 on both sides: ONNX Runtime's convolutions sum in another order than PyTorch's. Measured
# max |diff| ~5e-6 over ~40 layers; 1e-4 leaves room for other CPUs and is still 80 times smaller
# than one 8-bit level (2/255). A wrong cache frame, padding or axis order gives errors of 0.1-1.
ATOL = 1e-4


@pytest.fixture(scope="module")
def decoder(vae_decoder):
    return vae_decoder


def sample(out, decoder_dir, path_env, shape="4,6,8", save_frames=True, extra=()):
    env = {**os.environ, "PATH": str(path_env)}
    return subprocess.run([str(flowstep_bin()), "sample", "--artifacts", str(TINY), "--context", str(PROMPT), "--shape", shape,
                           "--num-samples", "2", "--steps", "2", "--seed", "3", "--out", str(out),
                           "--vae-decoder", str(decoder_dir), "--fps", "8", *(["--save-frames"] if save_frames else []), *extra],
                          capture_output=True, text=True, timeout=300, env=env)


def test_sample_decodes_like_diffsynth(decoder, tmp_path):
    manifest = json.loads((decoder / "decoder" / "vae_decoder.json").read_text())
    assert manifest["check"]["max_abs_diff"] <= ATOL and manifest["caches"] > 0
    # --device cuda: every node has a CUDA kernel in ONNX Runtime 1.31.1 (checked without a GPU).
    from flowstep_export.pipeline.cuda_coverage import main as cuda_coverage

    assert cuda_coverage([str(decoder / "decoder" / g) for g in manifest["graphs"].values()]) == 0
    tools = tmp_path / "bin"
    tools.mkdir()
    import imageio_ffmpeg

    (tools / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    out = tmp_path / "out"
    r = sample(out, decoder / "decoder", tools)
    assert r.returncode == 0, r.stderr
    latents = load_file(str(out / "samples.safetensors"))["latents"]
    assert list(latents.shape) == [2, 16, 4, 6, 8]
    frames = load_file(str(out / "videos.safetensors"))["frames"]
    # 4 latent frames -> 1 + 4·3 frames; 6x8 latents -> 48x64 pixels (not the export's example size).
    assert list(frames.shape) == [2, 3, 13, 48, 64]

    vae = reference_vae(decoder / "wan_2.1_vae.safetensors")
    with torch.no_grad():
        reference = vae.decode(latents, device="cpu")
    assert reference.std() > 0.2 and (reference.abs() < 0.99).float().mean() > 0.5, "the test needs frames away from the clamp"
    torch.testing.assert_close(frames, reference, rtol=0, atol=ATOL)

    # The contact sheet: DiffSynth's uint8 conversion of the same frames (8 evenly spaced; 13 -> these).
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    sheet = np.asarray(Image.open(out / "videos.png").convert("RGB")).astype(int)
    picks = [0, 2, 3, 5, 7, 9, 10, 12]
    for row in range(2):
        ref_frames = pipe.vae_output_to_video(reference[row:row + 1])
        for col, f in enumerate(picks):
            y, x = row * (48 + 4), col * (64 + 4)
            got = sheet[y:y + 48, x:x + 64]
            diff = np.abs(got - np.asarray(ref_frames[f]).astype(int))
            # Truncation to uint8 can flip one level where a value sits on a boundary.
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (row, f)

    gif = Image.open(out / "videos.gif")
    assert gif.n_frames == 13 and gif.size == (2 * 64 + 4, 48)
    for i in range(2):
        reader = iio.get_reader(out / f"video-{i:03}.mp4", format="FFMPEG")
        decoded = [frame for frame in reader]
        assert reader.get_meta_data()["fps"] == 8
        reader.close()
        assert len(decoded) == 13 and decoded[0].shape == (48, 64, 3)
        # H.264 is lossy (yuv420p subsampling of noise-like frames): only a loose match.
        ref = np.stack([np.asarray(im) for im in pipe.vae_output_to_video(reference[i:i + 1])]).astype(float)
        assert np.abs(np.stack(decoded).astype(float) - ref).mean() < 40


def test_tiled_decode_like_diffsynth(decoder, tmp_path):
    """--vae-tile 4,4 on 6×8 latents: 2×3 tiles overlapping by half, blended as DiffSynth's
    tiled_decode with tile_size (4, 4) and tile_stride (2, 2)."""
    out = tmp_path / "tiled"
    r = sample(out, decoder / "decoder", tmp_path, extra=["--vae-tile", "4,4"])
    assert r.returncode == 0, r.stderr
    latents = load_file(str(out / "samples.safetensors"))["latents"]
    frames = load_file(str(out / "videos.safetensors"))["frames"]
    vae = reference_vae(decoder / "wan_2.1_vae.safetensors")
    with torch.no_grad():
        tiled = vae.decode(latents, device="cpu", tiled=True, tile_size=(4, 4), tile_stride=(2, 2))
        whole = vae.decode(latents, device="cpu")
    assert (tiled - whole).abs().max() > 0.05, "the tiles must matter for this test to mean anything"
    torch.testing.assert_close(frames, tiled, rtol=0, atol=ATOL)


def test_no_ffmpeg_is_one_warning_and_bad_decoder_dir_is_one_error(decoder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = sample(tmp_path / "a", decoder / "decoder", empty, shape="2,4,4", save_frames=False)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "a" / "videos.safetensors").exists()
    warnings = [l for l in r.stderr.splitlines() if "MP4" in l]
    assert len(warnings) == 1 and warnings[0].startswith("warning: no MP4 written"), r.stderr
    assert not list((tmp_path / "a").glob("*.mp4")) and (tmp_path / "a" / "videos.gif").is_file()

    tampered = tmp_path / "tampered"
    shutil.copytree(decoder / "decoder", tampered)
    with open(tampered / "vae_decoder.weights", "r+b") as f:
        f.seek(100)
        f.write(b"\x7f\x7f\x7f\x7f")
    other_model = tmp_path / "other_model"  # a VAE for 48-channel latents (Wan2.2's), not this model's 16
    shutil.copytree(decoder / "decoder", other_model)
    manifest = json.loads((other_model / "vae_decoder.json").read_text())
    (other_model / "vae_decoder.json").write_text(json.dumps({**manifest, "z_dim": 48}))
    for bad, message in [(tampered, "sha256 differs"), (tmp_path / "empty", "vae_decoder.json"),
                         (other_model, "the VAE takes 48 latent channels, this model makes 16")]:
        r = sample(tmp_path / "b", bad, empty, shape="2,4,4")
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert not (tmp_path / "b").exists(), "a bad decoder is refused before any work"


def test_wan22_decoder_decodes_ti2v_samples_like_diffsynth(vae22_decoder, tmp_path):
    """The Wan2.2 VAE's decoder (48 channels, 16x: DiffSynth's Decoder3d_38 and unpatchify)
    decodes tiny-ti2v's samples as WanVideoVAE38.decode does, whole and in tiles; the sampled
    latent frame 0 is the condition's, so its decoded frame is the same for every seed."""
    manifest = json.loads((vae22_decoder / "decoder" / "vae_decoder.json").read_text())
    assert manifest["z_dim"] == 48 and manifest["upsampling"] == {"time": 4, "space": 16}, manifest
    assert manifest["check"]["max_abs_diff"] <= ATOL
    from flowstep_export.pipeline.cuda_coverage import main as cuda_coverage

    assert cuda_coverage([str(vae22_decoder / "decoder" / g) for g in manifest["graphs"].values()]) == 0
    condition = tmp_path / "condition.safetensors"
    first = torch.randn(48, 1, 4, 6, generator=torch.Generator().manual_seed(5))
    save_file({"first_frame_latents": first}, str(condition))
    vae = reference_vae22(vae22_decoder / "Wan2.2_VAE.pth")
    for tile in (None, (2, 4)):
        out = tmp_path / f"tile-{tile}"
        r = subprocess.run([str(flowstep_bin()), "sample", "--artifacts", str(TINY_TI2V), "--context", str(PROMPT),
                            "--condition", str(condition), "--shape", "3,4,6", "--num-samples", "2", "--steps", "2",
                            "--seed", "3", "--out", str(out), "--vae-decoder", str(vae22_decoder / "decoder"),
                            "--save-frames", *(["--vae-tile", ",".join(map(str, tile))] if tile else [])],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        latents = load_file(str(out / "samples.safetensors"))["latents"]
        assert list(latents.shape) == [2, 48, 3, 4, 6]
        assert torch.equal(latents[:, :, :1], first.expand(2, -1, -1, -1, -1))
        frames = load_file(str(out / "videos.safetensors"))["frames"]
        # 3 latent frames -> 1 + 4·2 frames; 4x6 latents -> 64x96 pixels.
        assert list(frames.shape) == [2, 3, 9, 64, 96]
        with torch.no_grad():
            whole = vae.decode(latents, device="cpu")
            reference = whole if tile is None else vae.decode(latents, device="cpu", tiled=True, tile_size=tile,
                                                              tile_stride=(tile[0] // 2, tile[1] // 2))
        assert reference.std() > 0.2 and (reference.abs() < 0.99).float().mean() > 0.5, "the test needs frames away from the clamp"
        if tile is not None:
            assert (reference - whole).abs().max() > 0.05, "the tiles must matter for this test to mean anything"
        torch.testing.assert_close(frames, reference, rtol=0, atol=ATOL)
        assert torch.equal(frames[0, :, 0], frames[1, :, 0]) and (frames[0, :, 1:] - frames[1, :, 1:]).abs().max() > 0.05
        gif = Image.open(out / "videos.gif")
        assert gif.n_frames == 9 and gif.size == (2 * 96 + 4, 64)
