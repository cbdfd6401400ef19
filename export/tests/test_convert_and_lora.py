"""DiffSynth interop: its cached samples convert to flowstep's format, and the LoRA files
flowstep writes load in DiffSynth's own LoRA loader with the same effect."""

import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowstep_export.data.convert_diffsynth import main as convert_main
from flowstep_export.reference.goldens import load_model

from independent import TINY, flowstep_bin


def test_convert_diffsynth_cache(tmp_path):
    cache = tmp_path / "cache" / "0"
    cache.mkdir(parents=True)
    latents = torch.randn(1, 16, 2, 8, 8, dtype=torch.bfloat16)
    context = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    shared = {"input_latents": latents, "height": 64, "width": 64, "num_frames": 5}
    torch.save((shared, {"context": context}, {}), cache / "0.pth")
    torch.save(({"height": 64}, {"context": context}, {}), tmp_path / "bad.pth")
    out = tmp_path / "data"
    assert convert_main([str(tmp_path / "cache"), str(out), "--dtype", "f32"]) == 0
    (sample,) = out.glob("*.safetensors")
    tensors = load_file(str(sample))
    assert tensors["latents"].shape == (16, 2, 8, 8) and tensors["context"].shape == (16, 64)
    assert torch.equal(tensors["latents"], latents[0].float())
    bad_dir = tmp_path / "badcache"
    bad_dir.mkdir()
    (tmp_path / "bad.pth").rename(bad_dir / "bad.pth")
    assert convert_main([str(bad_dir), str(tmp_path / "x")]) == 1


def test_convert_keeps_image_conditioning(tmp_path):
    """An I2V cache's `y` and `clip_feature` and a TI2V cache's `first_frame_latents` are kept
    under DiffSynth's names without the batch axis; full-range boundaries write no file."""
    cache = tmp_path / "cache"
    cache.mkdir()
    y, clip, first = torch.randn(1, 20, 2, 8, 8), torch.randn(1, 257, 1280), torch.randn(1, 48, 1, 8, 8)
    shared = {"input_latents": torch.randn(1, 16, 2, 8, 8), "y": y, "clip_feature": clip,
              "max_timestep_boundary": 1.0, "min_timestep_boundary": 0.0}
    torch.save((shared, {"context": torch.randn(1, 16, 64)}, {}), cache / "i2v.pth")
    out = tmp_path / "i2v"
    assert convert_main([str(cache), str(out), "--dtype", "f32"]) == 0
    (sample,) = (load_file(str(p)) for p in out.glob("*.safetensors"))
    assert torch.equal(sample["y"], y[0]) and torch.equal(sample["clip_feature"], clip[0])
    assert not (out / "diffsynth_boundaries.json").exists()
    shared = {"input_latents": torch.randn(1, 48, 3, 8, 8), "first_frame_latents": first,
              "fuse_vae_embedding_in_latents": True}
    torch.save((shared, {"context": torch.randn(1, 16, 64)}, {}), cache / "i2v.pth")
    out = tmp_path / "ti2v"
    assert convert_main([str(cache), str(out), "--dtype", "f32"]) == 0
    (sample,) = (load_file(str(p)) for p in out.glob("*.safetensors"))
    assert sorted(sample) == ["context", "first_frame_latents", "latents"]
    assert torch.equal(sample["first_frame_latents"], first[0])


def diffsynth_wan(config):
    from diffsynth.models.wan_video_dit import WanModel
    return WanModel(dim=config.dim, in_dim=config.in_dim, ffn_dim=config.ffn_dim, out_dim=config.out_dim,
                    text_dim=config.text_dim, freq_dim=config.freq_dim, eps=config.eps, patch_size=config.patch_size,
                    num_heads=config.num_heads, num_layers=config.num_layers, has_image_input=False)


@pytest.mark.parametrize("fmt", ["diffsynth", "comfyui"])
def test_diffsynth_loader_accepts_flowstep_lora(tmp_path, fmt):
    """Train a few steps with the flowstep binary, fuse its LoRA file with DiffSynth's
    GeneralLoRALoader, and compare against flowstep's own LoRA forward."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video
    from diffsynth.utils.lora.general import GeneralLoRALoader

    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        save_file({"latents": torch.randn(16, 2, 8, 8, generator=g), "context": torch.randn(16, 64, generator=g)},
                  str(data / f"{i}.safetensors"))
    out = tmp_path / "run"
    result = subprocess.run([str(flowstep_bin()), "-q", "train", "--artifacts", str(TINY), "--data", str(data),
                             "--out", str(out), "--steps", "15", "--lr", "5e-3", "--lora-format", fmt, "--lora-dtype", "f32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lora_file = load_file(str(out / "lora.safetensors"))

    # flowstep's view: our model with the trained flat buffer (from the final checkpoint).
    config, ours, layout = load_model(TINY)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    flat = load_file(str(ckpt / "state.safetensors"))["params"]
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for t in layout:
            params[t.key].copy_(flat[t.offset:t.offset + t.numel].reshape(t.shape))
    assert any(params[t.key].abs().max() > 0 for t in layout if ".lora_B." in t.key)

    # DiffSynth's view: its own WanModel with the base weights, LoRA fused by its loader.
    theirs = diffsynth_wan(config)
    theirs.load_state_dict(load_file(str(TINY / "base.safetensors")))
    GeneralLoRALoader(torch_dtype=torch.float32).fuse_lora_to_base_model(theirs, lora_file)

    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 16, 64, generator=g)
    t = torch.tensor([600.0])
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = model_fn_wan_video(theirs, latents=x, timestep=t, context=ctx)
        base_only = diffsynth_wan(config)
        base_only.load_state_dict(load_file(str(TINY / "base.safetensors")))
        c = model_fn_wan_video(base_only, latents=x, timestep=t, context=ctx)
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < 1e-5, f"DiffSynth-fused vs flowstep LoRA: rel err {err:.2e}"
    assert ((a - c).abs().max() / c.abs().max()).item() > 1e-4, "the LoRA must change the output"
