"""Wan2.1 I2V, Wan2.2 TI2V and the Wan2.2 A14B experts against DiffSynth-Studio's own
WanModel in each variant's configuration (has_image_input, require_clip_embedding,
seperated_timestep + fuse_vae_embedding_in_latents, ...): our forward, and the exported
graphs' loss and LoRA gradient against DiffSynth's FlowMatchSFTLoss + PEFT under autograd."""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from flowstep_export.model.configs import get_config
from flowstep_export.pipeline.export import ExportOptions, export_artifacts
from flowstep_export.model.lora import LoraConfig
from flowstep_export.model.model import WanModel, init_random
from independent import ROOT, diffsynth_flags, diffsynth_peft, flatten, flowstep, manifest, velocity

diffsynth_dit = pytest.importorskip("diffsynth.models.wan_video_dit")

TINY_TI2V = ROOT / "models" / "tiny-ti2v" / "artifacts"
TINY_A14B = ROOT / "models" / "tiny-a14b"
VARIANTS = ("tiny-i2v", "tiny-ti2v", "tiny-i2v-a14b", "tiny-a14b")


def conditioning(model: dict, latent, g) -> dict[str, torch.Tensor]:
    """Random conditioning inputs with a batch axis, shaped as the manifest lists them."""
    sizes = dict(zip(("frames", "height", "width"), latent))
    return {c["name"]: torch.randn((1, *(sizes.get(d, d) for d in c["shape"])), generator=g)
            for c in model.get("conditioning", [])}


@pytest.mark.parametrize("latent", [(3, 8, 8), (2, 4, 6)])
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_diffsynth(name, latent):
    config = get_config(name)
    ours = WanModel(config)
    init_random(ours, seed=1)
    model = config.to_manifest()
    ref = diffsynth_dit.WanModel(dim=config.dim, in_dim=config.in_dim, ffn_dim=config.ffn_dim, out_dim=config.out_dim,
                                 text_dim=config.text_dim, freq_dim=config.freq_dim, eps=config.eps,
                                 patch_size=config.patch_size, num_heads=config.num_heads,
                                 num_layers=config.num_layers, **diffsynth_flags(model))
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, config.out_dim, *latent), generator=g)
    ctx = torch.randn((1, config.text_len, config.text_dim), generator=g)
    cond = conditioning(model, latent, g)
    for t in (999.8, 500.6, 4.98):
        timestep = torch.tensor([t])
        with torch.no_grad():
            a = ours(x, timestep, ctx, *cond.values())
            b = velocity(ref, x, timestep, ctx, **cond)
        # As for t2v (test_model_parity.py): DiffSynth's float64 time embedding and RoPE
        # against our float32 stay below 1e-5 of the output scale.
        err = (a - b).abs().max() / b.abs().max()
        assert err < 1e-5, f"{name} {latent} t={t}: rel err {err:.2e}"


def artifacts(which, tiny_i2v):
    return {"tiny-ti2v": TINY_TI2V, "tiny-a14b-high": TINY_A14B / "high_noise" / "artifacts",
            "tiny-a14b-low": TINY_A14B / "low_noise" / "artifacts", "tiny-i2v": tiny_i2v}[which]


def session(art, name):
    return ort.InferenceSession(str(art / f"{name}.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("which,latent,index", [
    ("tiny-ti2v", (3, 8, 8), 120), ("tiny-ti2v", (2, 6, 4), 700), ("tiny-i2v", (3, 8, 6), 300),
    ("tiny-a14b-high", (2, 8, 8), 200), ("tiny-a14b-low", (2, 8, 8), 900)])
def test_training_graph_equals_diffsynth_loss_autograd(tiny_i2v, which, latent, index):
    """One step of DiffSynth's FlowMatchSFTLoss (its scheduler, its first-frame handling, its
    model_fn) with PEFT LoRA, differentiated by autograd, against the training graph fed the
    same draw. TI2V's frame 0 is the image and out of the loss in both."""
    from diffsynth.diffusion import loss as diffsynth_loss
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    art = artifacts(which, tiny_i2v)
    m = manifest(art)
    g = torch.Generator().manual_seed(index)
    init = load_file(str(art / "lora_init.safetensors"))
    lora = {k: v if ".lora_A." in k else 0.05 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    x0 = torch.randn((1, m["model"]["out_dim"], *latent), generator=g)
    ctx = torch.randn((1, m["model"]["text_len"], m["model"]["text_dim"]), generator=g)
    cond = conditioning(m["model"], latent, g)
    noise = torch.randn(x0.shape, generator=g)

    dit = diffsynth_peft(art, lora)
    for n, p in dit.named_parameters():
        p.requires_grad_("lora_" in n)
    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(1000, training=True)
    pipe = SimpleNamespace(scheduler=scheduler, torch_dtype=torch.float32, device="cpu", in_iteration_models=("dit",),
                           dit=dit, model_fn=model_fn_wan_video)
    inputs = dict(cond)
    if "first_frame_latents" in inputs:
        inputs["fuse_vae_embedding_in_latents"] = True  # what DiffSynth's TI2V cache holds with them
    with mock.patch.object(diffsynth_loss.torch, "randint", lambda *a, **k: torch.tensor([index])), \
         mock.patch.object(diffsynth_loss.torch, "randn_like", lambda x: noise.clone()):
        ref_loss = diffsynth_loss.FlowMatchSFTLoss(pipe, input_latents=x0.clone(), context=ctx, **inputs)
    ref_loss.backward()
    ref_grad = flatten(art, {n: p.grad for n, p in dit.named_parameters() if "lora_" in n}).numpy()

    t = scheduler.timesteps[index:index + 1]
    feeds = {**{k: v.numpy() for k, v in load_file(str(art / "base.safetensors")).items()},
             "lora_params": flatten(art, lora).numpy(), "grad_accum": np.zeros(m["lora"]["num_params"], np.float32),
             "lora_scale": np.array(m["lora"]["alpha"] / m["lora"]["rank"], np.float32),
             "x_t": scheduler.add_noise(x0, noise, t).numpy(), "timestep": t.numpy(), "context": ctx.numpy(),
             "target": scheduler.training_target(x0, noise, t).numpy(),
             "weight": np.array(float(scheduler.training_weight(t)), np.float32),
             **{k: v.numpy() for k, v in cond.items()}}
    sess = session(art, "training_model")
    loss, grad = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert np.abs(ref_grad).max() > 0
    # float32 on both sides, DiffSynth's time embedding and RoPE in float64: 1e-4 of the
    # largest gradient (observed ~1e-6); a wrong frame, timestep or input moves it by O(1).
    assert np.abs(grad - ref_grad).max() <= 1e-4 * np.abs(ref_grad).max()

    sess = session(art, "inference_model")
    (v,) = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    with torch.no_grad():
        want = velocity(dit, torch.as_tensor(feeds["x_t"]), t, ctx, **cond).numpy()
    assert np.abs(v - want).max() <= 1e-5 * np.abs(want).max()


def test_manifests_record_conditioning_and_expert(tiny_i2v):
    ti2v = manifest(TINY_TI2V)
    assert ti2v["model"]["variant"] == "ti2v" and "expert" not in ti2v
    assert ti2v["model"]["conditioning"] == [{"name": "first_frame_latents", "shape": [48, 1, "height", "width"]}]
    inputs = {i["name"]: i["shape"] for i in ti2v["graphs"]["training_model"]["inputs"]}
    assert inputs["first_frame_latents"] == [1, 48, 1, "height", "width"]
    assert inputs["x_t"] == [1, 48, "frames", "height", "width"]
    i2v = manifest(tiny_i2v)
    assert i2v["model"]["in_dim"] == 36 and i2v["model"]["out_dim"] == 16
    assert i2v["model"]["conditioning"] == [{"name": "y", "shape": [20, "frames", "height", "width"]},
                                            {"name": "clip_feature", "shape": [257, 1280]}]
    assert [i["name"] for i in i2v["graphs"]["inference_model"]["inputs"][-5:]] == [
        "x_t", "timestep", "context", "y", "clip_feature"]
    high, low = (manifest(TINY_A14B / r / "artifacts")["expert"] for r in ("high_noise", "low_noise"))
    assert high == {"role": "high_noise", "min_timestep_boundary": 0.0, "max_timestep_boundary": 0.417,
                    "switch_timestep": 875.0}
    assert low == {"role": "low_noise", "min_timestep_boundary": 0.417, "max_timestep_boundary": 1.0,
                   "switch_timestep": 875.0}


def test_expert_presets_refuse_a_missing_expert(tmp_path):
    with pytest.raises(ValueError, match="--expert high_noise or low_noise"):
        export_artifacts(get_config("tiny-a14b"), ExportOptions(out=tmp_path / "x"))
    with pytest.raises(ValueError, match="single model"):
        export_artifacts(get_config("tiny-ti2v"), ExportOptions(out=tmp_path / "y", expert="high_noise"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_shapes_only_export_equals_a_weighted_one(tmp_path):
    """--shapes-only (how the full-size presets export on a small machine) traces the same
    graph as an export with weights: the graphs never hold weights."""
    from independent import TINY

    options = ExportOptions(out=tmp_path, lora=LoraConfig(rank=8), attention_chunk=12, shapes_only=True,
                            graphs=("inference_model",))
    export_artifacts(get_config("tiny"), options)
    for name in ("inference_model.onnx", "lora_init.safetensors"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name
    with pytest.raises(ValueError, match="not with --base or --ship-base"):
        export_artifacts(get_config("tiny"), ExportOptions(out=tmp_path / "x", shapes_only=True, ship_base=True))


def test_i2v_trains_and_samples_with_y_and_clip_feature(tiny_i2v, tmp_path):
    """flowstep binds `y` and `clip_feature` from each sample (and from --condition): a short
    run learns, and its LoRA file is what the trained parameters say."""
    from safetensors.torch import save_file

    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        save_file({"latents": torch.randn(16, 2, 8, 8, generator=g), "context": torch.randn(16, 64, generator=g),
                   "y": torch.randn(20, 2, 8, 8, generator=g), "clip_feature": torch.randn(257, 1280, generator=g)},
                  str(data / f"{i}.safetensors"))
    out = tmp_path / "run"
    flowstep("-q", "train", "--artifacts", tiny_i2v, "--data", data, "--out", out, "--steps", 4, "--lr", "1e-2",
             "--lora-dtype", "f32")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(m["applied"] and m["grad_norm"] > 0 for m in metrics)
    lora = load_file(str(out / "lora.safetensors"))
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".lora_B." in k), "the LoRA must have moved"
    cond = tmp_path / "image.safetensors"
    save_file({"y": torch.randn(20, 2, 8, 8, generator=g), "clip_feature": torch.randn(257, 1280, generator=g)}, str(cond))
    save_file({"context": torch.randn(16, 64, generator=g)}, str(tmp_path / "prompt.safetensors"))
    args = ["-q", "sample", "--artifacts", tiny_i2v, "--context", tmp_path / "prompt.safetensors", "--shape", "2,8,8",
            "--num-samples", 1, "--steps", 3, "--lora", out / "lora.safetensors"]
    flowstep(*args, "--condition", cond, "--out", tmp_path / "s1")
    other = tmp_path / "other.safetensors"
    save_file({"y": torch.randn(20, 2, 8, 8, generator=g), "clip_feature": torch.randn(257, 1280, generator=g)}, str(other))
    flowstep(*args, "--condition", other, "--out", tmp_path / "s2")
    a, b = (load_file(str(tmp_path / d / "samples.safetensors"))["latents"] for d in ("s1", "s2"))
    assert (a - b).abs().max() > 1e-4, "the image conditioning must change the sample"
    bad = flowstep(*args, "--out", tmp_path / "s3", check=False)
    assert bad.returncode == 1 and "--condition" in bad.stderr


def test_i2v_a14b_expert_exports_and_flowstep_accepts_its_manifest(tmp_path):
    """The Wan2.2 I2V-A14B shape (y without CLIP tokens, two experts at 0.358 / t = 900):
    flowstep validates the manifest the export writes."""
    options = ExportOptions(out=tmp_path, lora=LoraConfig(rank=4), attention_chunk=12, shapes_only=True,
                            expert="low_noise", graphs=("training_model", "optimizer_model"))
    export_artifacts(get_config("tiny-i2v-a14b"), options)
    m = manifest(tmp_path)
    assert m["expert"] == {"role": "low_noise", "min_timestep_boundary": 0.358, "max_timestep_boundary": 1.0,
                           "switch_timestep": 900.0}
    assert m["model"]["conditioning"] == [{"name": "y", "shape": [20, "frames", "height", "width"]}]
    assert not any("img" in t["name"] for t in m["base_weights"]["tensors"])
    result = flowstep("inspect", "--no-load", "--artifacts", tmp_path)
    assert "expert      low_noise of a Wan2.2 pair: timestep boundaries [0.358, 1)" in result.stdout, result.stdout


def static_i2v_video(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A static latent video (every frame one per-sample colour pattern) [16, 3, 8, 8] and its
    `y` as prepare builds it from the first frame: the first-frame mask, then that frame's
    latents followed by zeros (the latents of black frames stand-in)."""
    from flowstep_export.data.image_conditioning import first_frame_mask

    g = torch.Generator().manual_seed(seed)
    frame = 2.5 * torch.randn(16, 1, 1, 1, generator=g) + 0.5 * torch.randn(1, 1, 8, 8, generator=g)
    image_latents = torch.cat([frame, torch.zeros(16, 2, 8, 8)], dim=1)
    return frame.expand(16, 3, 8, 8).contiguous(), torch.cat([first_frame_mask(9, 64, 64), image_latents])


def test_i2v_lora_learns_to_use_its_image(tiny_i2v, tmp_path):
    """An I2V LoRA does something measurable with its image: trained on static videos, it predicts
    held-out videos better from their own `y` than from another video's (same latents, noise,
    context and CLIP tokens; only `y` differs). Measured: 0.34% apart before training (7.4298 vs
    7.4548), 3.2% after 600 steps (6.8256 vs 7.0545); the TI2V analogue is tests/variants.rs."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4242)
    context, clip = torch.randn(16, 64, generator=g), torch.zeros(257, 1280)

    def write(folder, i, video, y):
        folder.mkdir(exist_ok=True)
        save_file({"latents": video, "context": context, "y": y, "clip_feature": clip}, str(folder / f"{i:03}.safetensors"))

    train, own, other = (tmp_path / d for d in ("train", "own", "other"))
    for i in range(16):
        write(train, i, *static_i2v_video(i))
    for i in range(6):
        video, y = static_i2v_video(100 + i)
        write(own, i, video, y)
        write(other, i, video, static_i2v_video(100 + (i + 1) % 6)[1])

    def eval_loss(data, lora=None):
        r = flowstep("eval", "--artifacts", tiny_i2v, "--data", data, "--json", "--seed", 3, *(["--lora", lora] if lora else []))
        return json.loads(r.stdout)["eval_loss"]

    before_own, before_other = eval_loss(own), eval_loss(other)
    out = tmp_path / "run"
    flowstep("-q", "train", "--artifacts", tiny_i2v, "--data", train, "--out", out, "--steps", 600, "--lr", "5e-3", "--seed", 1)
    after_own, after_other = eval_loss(own, out / "lora.safetensors"), eval_loss(other, out / "lora.safetensors")
    assert abs(before_own / before_other - 1) < 0.01, (before_own, before_other)
    assert after_own < 0.98 * after_other, (after_own, after_other)
