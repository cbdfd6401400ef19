"""Our Wan forward against DiffSynth-Studio's own modules with the same weights."""

import pytest
import torch

from flowstep_export.model.configs import get_config
from flowstep_export.model.lora import LoraConfig, inject_lora
from flowstep_export.model.model import WanModel, init_random

diffsynth_dit = pytest.importorskip("diffsynth.models.wan_video_dit")
from diffsynth.pipelines.wan_video import model_fn_wan_video  # noqa: E402


def diffsynth_model(config):
    return diffsynth_dit.WanModel(
        dim=config.dim, in_dim=config.in_dim, ffn_dim=config.ffn_dim, out_dim=config.out_dim,
        text_dim=config.text_dim, freq_dim=config.freq_dim, eps=config.eps, patch_size=config.patch_size,
        num_heads=config.num_heads, num_layers=config.num_layers, has_image_input=False,
    )


@pytest.mark.parametrize("name,latent", [("tiny", (3, 8, 8)), ("tiny", (1, 4, 6)), ("small", (2, 8, 12))])
def test_forward_equals_diffsynth(name, latent):
    config = get_config(name)
    ours = WanModel(config)
    init_random(ours, seed=1)
    ref = diffsynth_model(config)
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, config.in_dim, *latent), generator=g)
    ctx = torch.randn((1, config.text_len, config.text_dim), generator=g)
    for t in (999.8, 500.6, 4.98):
        timestep = torch.tensor([t])
        with torch.no_grad():
            a = ours(x, timestep, ctx)
            b = model_fn_wan_video(ref, latents=x, timestep=timestep, context=ctx)
        # DiffSynth computes the sinusoidal time embedding and RoPE in float64; we use
        # float32 (portable). The angle t·f has error ≤ |t|·2^-24 ≈ 6e-5 rad; through the
        # network that stays below 1e-5 of the output scale.
        err = (a - b).abs().max() / b.abs().max()
        assert err < 1e-5, f"{name} {latent} t={t}: rel err {err:.2e}"


def test_lora_keys_match_peft():
    """DiffSynth injects LoRA with PEFT; our key names must be PEFT's."""
    peft = pytest.importorskip("peft")
    config = get_config("tiny")
    ours = WanModel(config)
    keys = inject_lora(ours, LoraConfig(rank=4))
    ref = diffsynth_model(config)
    ref = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q", "k", "v", "o", "ffn.0", "ffn.2"]), ref)
    peft_keys = [k for k in ref.state_dict() if "lora_" in k]
    assert keys == peft_keys
    assert "blocks.0.self_attn.q.lora_A.default.weight" in keys
    assert not any("k_img" in k for k in keys)


def test_lora_init_and_scaling():
    config = get_config("tiny")
    model = WanModel(config)
    init_random(model, 0)
    x = torch.randn(1, config.in_dim, 1, 4, 4)
    t, ctx = torch.tensor([500.0]), torch.randn(1, config.text_len, config.text_dim)
    with torch.no_grad():
        before = model(x, t, ctx)
    inject_lora(model, LoraConfig(rank=4, alpha=8))
    layer = model.blocks[0].self_attn.q
    assert layer.lora_scale.item() == 2.0
    assert torch.all(layer.lora_B["default"].weight == 0)
    bound = 1 / config.dim**0.5
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= bound and a.std() > bound / 3
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), before), "B = 0: LoRA starts as the identity"
