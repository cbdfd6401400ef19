"""flowstep's LoRA files in other tools' own loaders, and those tools' files in flowstep.

The default file (ComfyUI layout: `diffusion_model.` keys and `.alpha`), trained at rank 8
with alpha 4, goes through diffusers' Wan LoRA loader (WanLoraLoaderMixin into
WanTransformer3DModel with PEFT) with nothing dropped and the same weight deltas; files that
diffusers' own save functions write come back into `flowstep eval` with the same loss.
musubi-tuner and ComfyUI are not on PyPI: MUSUBI_TUNER_DIR and COMFYUI_DIR name checkouts
whose own code the last tests run (skipped without them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from independent import final_state, flowstep, manifest
from lora_run import ALPHA, RANK

# Wan module -> diffusers WanTransformer3DModel module, written out from diffusers' model code.
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}


def diffusers_module(module: str) -> str:
    _, block, inner = module.split(".", 2)
    return f"blocks.{block}.{DIFFUSERS[inner]}"


def trained_pairs(alpha_run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Wan module -> (A, B) of the trained parameters."""
    return {k.split(".lora_A.")[0]: (v, alpha_run.trained[k.replace(".lora_A.", ".lora_B.")])
            for k, v in alpha_run.trained.items() if ".lora_A." in k}


def wan_transformer(art: Path):
    from diffusers import WanTransformer3DModel

    m = manifest(art)["model"]
    return WanTransformer3DModel(patch_size=tuple(m["patch_size"]), num_attention_heads=m["num_heads"],
                                 attention_head_dim=m["dim"] // m["num_heads"], in_channels=m["in_dim"],
                                 out_channels=m["out_dim"], text_dim=m["text_dim"], freq_dim=m["freq_dim"],
                                 ffn_dim=m["ffn_dim"], num_layers=m["num_layers"], eps=m["eps"])


@contextlib.contextmanager
def warnings_of(*loggers: str):
    """Records WARNING and above from the named loggers (diffusers' do not propagate)."""
    records: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Recorder(logging.WARNING)
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        yield records
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)


def load_in_diffusers(path: Path, art: Path):
    """diffusers' Wan path: lora_state_dict (with its non-diffusers conversion), then
    load_lora_into_transformer; returns the transformer and every warning it logged."""
    from diffusers import WanPipeline

    transformer = wan_transformer(art)
    with warnings_of("diffusers", "peft") as messages:
        state_dict, metadata = WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        WanPipeline.load_lora_into_transformer(state_dict, transformer=transformer, metadata=metadata, adapter_name="flowstep")
    return transformer, messages


def peft_deltas(transformer) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight("flowstep").detach() for name, module in transformer.named_modules()
            if isinstance(module, LoraLayer) and "flowstep" in module.lora_A}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def eval_loss(alpha_run, lora: Path) -> float:
    result = flowstep("eval", "--artifacts", alpha_run.art, "--data", alpha_run.data, "--json", "--seed", 1, "--lora", lora)
    return json.loads(result.stdout)["eval_loss"]


def default_file(alpha_run) -> Path:
    return alpha_run.runs["comfyui", "f32"] / "lora.safetensors"


def file_pairs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Wan module -> (A, B) as stored in a ComfyUI-layout file, as float32."""
    file = load_file(str(path))
    return {k.removeprefix("diffusion_model.").removesuffix(".lora_A.weight"): (v.float(), file[k.replace(".lora_A.", ".lora_B.")].float())
            for k, v in file.items() if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_default_file_loads_in_diffusers_with_nothing_dropped(alpha_run, dtype):
    """Every module of the default file becomes a PEFT layer in diffusers, with no warning,
    and its delta is B·A·alpha/rank: flowstep's trained parameters (f32 file), or the
    file's own bf16 values (bf16, the default dtype)."""
    path = alpha_run.runs["comfyui", dtype] / "lora.safetensors"
    transformer, messages = load_in_diffusers(path, alpha_run.art)
    assert messages == []
    got = peft_deltas(transformer)
    pairs = trained_pairs(alpha_run) if dtype == "f32" else file_pairs(path)
    want = {diffusers_module(m): b @ a * (ALPHA / RANK) for m, (a, b) in pairs.items()}
    assert sorted(got) == sorted(want)
    for name, delta in want.items():
        assert rel(got[name], delta) < 1e-6, f"{name}: {rel(got[name], delta):.2e}"


def test_diffsynth_layout_is_dropped_by_diffusers(alpha_run):
    """Why DiffSynth keys are not the default: diffusers loads nothing from them."""
    transformer, messages = load_in_diffusers(alpha_run.runs["diffsynth", "f32"] / "lora.safetensors", alpha_run.art)
    assert peft_deltas(transformer) == {}
    assert any("No LoRA keys" in m for m in messages), messages


def test_files_diffusers_saves_load_in_flowstep(alpha_run, tmp_path):
    """The trained pairs in a PEFT adapter on WanTransformer3DModel, saved by diffusers itself:
    pipeline-level with its metadata (lora_alpha 4), model-level (unprefixed keys), and with no
    metadata (scale 1, so B is stored times alpha/rank). `flowstep eval` gives the same loss
    as for flowstep's own file: the same parameters, bit for bit."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pairs = trained_pairs(alpha_run)
    transformer = wan_transformer(alpha_run.art)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[diffusers_module(m) for m in pairs]))
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for m, (a, b) in pairs.items():
            modules[diffusers_module(m)].lora_A["default"].weight.copy_(a)
            modules[diffusers_module(m)].lora_B["default"].weight.copy_(b)
    layers = get_peft_model_state_dict(transformer)
    WanPipeline.save_lora_weights(tmp_path / "pipeline", transformer_lora_layers=layers,
                                  transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    transformer.save_lora_adapter(tmp_path / "model")
    unscaled = {k: v * (ALPHA / RANK) if ".lora_B." in k else v for k, v in layers.items()}
    WanPipeline.save_lora_weights(tmp_path / "bare", transformer_lora_layers=unscaled)

    want = eval_loss(alpha_run, default_file(alpha_run))
    for name, prefix in [("pipeline", "transformer."), ("model", "blocks."), ("bare", "transformer.")]:
        (path,) = (tmp_path / name).glob("*.safetensors")
        keys = load_file(str(path)).keys()
        assert len(keys) == 2 * len(pairs) and all(k.startswith(prefix) for k in keys), (name, sorted(keys)[:3])
        assert eval_loss(alpha_run, path) == want, name

    # --init-lora reads the same parameters: one step from either file is the same step.
    def first_step(init: Path, out: Path) -> tuple[float, torch.Tensor]:
        flowstep("-q", "train", "--artifacts", alpha_run.art, "--data", alpha_run.data, "--out", out, "--steps", 1,
                 "--seed", 2, "--init-lora", init)
        loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        return loss, final_state(out)["params"]

    (bare,) = (tmp_path / "bare").glob("*.safetensors")
    want_loss, want_params = first_step(default_file(alpha_run), tmp_path / "from-default")
    got_loss, got_params = first_step(bare, tmp_path / "from-diffusers")
    assert got_loss == want_loss and torch.equal(got_params, want_params)

    # A diffusers file trained on self-attention only is refused, naming its layout and the gap.
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(bare)).items() if ".attn2." not in k}, str(partial))
    result = flowstep("train", "--artifacts", alpha_run.art, "--data", alpha_run.data, "--out", tmp_path / "refused",
                      "--steps", 1, "--init-lora", partial, check=False)
    assert result.returncode != 0
    assert "diffusers/PEFT LoRA has no `transformer.blocks.0.attn2.to_q.lora_A.weight`" in result.stderr, result.stderr
    assert not (tmp_path / "refused").exists()


def musubi_convert(src: Path, dst: Path, target: str) -> subprocess.CompletedProcess:
    """musubi-tuner's own converter (src/musubi_tuner/convert_lora.py) from MUSUBI_TUNER_DIR."""
    checkout = os.environ.get("MUSUBI_TUNER_DIR")
    if not checkout:
        pytest.skip("MUSUBI_TUNER_DIR (a musubi-tuner checkout) not set")
    env = {**os.environ, "PYTHONPATH": str(Path(checkout) / "src")}
    result = subprocess.run([sys.executable, "-m", "musubi_tuner.convert_lora", "--input", str(src), "--output", str(dst),
                             "--target", target], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_musubi_converter_round_trip(alpha_run, tmp_path):
    """musubi's `--target default` turns the default file into its own training layout
    (`lora_unet_…lora_down/up` + `.alpha`): flowstep reads it back as the same parameters.
    `--target other` folds alpha into A and B (√(alpha/rank) each, no alpha key): the same
    deltas, so the same loss up to rounding; converted back, it gets musubi's int64 alpha =
    rank. DiffSynth keys come out as an empty file."""
    pairs = trained_pairs(alpha_run)
    musubi = tmp_path / "musubi.safetensors"
    musubi_convert(default_file(alpha_run), musubi, "default")
    converted = load_file(str(musubi))
    assert len(converted) == 3 * len(pairs) and all(k.startswith("lora_unet_blocks_") for k in converted)
    want = eval_loss(alpha_run, default_file(alpha_run))
    assert eval_loss(alpha_run, musubi) == want

    other = tmp_path / "other.safetensors"
    musubi_convert(musubi, other, "other")
    assert not any(k.endswith(".alpha") for k in load_file(str(other)))
    assert eval_loss(alpha_run, other) == pytest.approx(want, rel=1e-6)
    # Back to musubi's layout from a file with no alpha: musubi adds alpha = rank as int64.
    back = tmp_path / "back.safetensors"
    musubi_convert(other, back, "default")
    alphas = {v.dtype for k, v in load_file(str(back)).items() if k.endswith(".alpha")}
    assert alphas == {torch.int64}
    assert eval_loss(alpha_run, back) == pytest.approx(want, rel=1e-6)

    empty = tmp_path / "empty.safetensors"
    musubi_convert(alpha_run.runs["diffsynth", "f32"] / "lora.safetensors", empty, "default")
    assert load_file(str(empty)) == {}


def comfyui_wan(alpha_run):
    """ComfyUI's own Wan model (comfy.supported_models.WAN21_T2V, the export's config) with
    the export's base weights, in a ModelPatcher, from the checkout at COMFYUI_DIR."""
    checkout = os.environ.get("COMFYUI_DIR")
    if not checkout:
        pytest.skip("COMFYUI_DIR (a ComfyUI checkout with its requirements installed) not set")
    sys.path.insert(0, checkout)
    try:
        from comfy.cli_args import args
        args.cpu = True  # before comfy.model_management reads it
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
    finally:
        sys.path.remove(checkout)
    m = manifest(alpha_run.art)["model"]
    config = comfy.supported_models.WAN21_T2V({
        "image_model": "wan2.1", "model_type": "t2v", "dim": m["dim"], "ffn_dim": m["ffn_dim"], "num_heads": m["num_heads"],
        "num_layers": m["num_layers"], "in_dim": m["in_dim"], "out_dim": m["out_dim"], "text_dim": m["text_dim"],
        "freq_dim": m["freq_dim"], "eps": m["eps"], "patch_size": tuple(m["patch_size"]), "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    base = load_file(str(alpha_run.art / "base.safetensors"))
    model.diffusion_model.load_state_dict(base, strict=True)  # Wan's names are ComfyUI's names
    cpu = torch.device("cpu")
    return comfy.sd, comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), base


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_default_file_loads_in_comfyui(alpha_run, dtype):
    """ComfyUI's LoraLoaderModelOnly path (comfy.sd.load_lora_for_models: its key map,
    lora_convert and load_lora) on its own Wan model: no key left unloaded, and the patched
    weights are W + B·A·alpha/rank (trained parameters, or the bf16 file's own values).
    DiffSynth keys patch nothing."""
    sd, patcher, base = comfyui_wan(alpha_run)
    path = alpha_run.runs["comfyui", dtype] / "lora.safetensors"
    pairs = trained_pairs(alpha_run) if dtype == "f32" else file_pairs(path)
    with warnings_of("") as messages:  # ComfyUI logs to the root logger
        patched, _ = sd.load_lora_for_models(patcher, None, load_file(str(path)), 1.0, 0.0)
    assert not [m for m in messages if "lora key not loaded" in m or "NOT LOADED" in m], messages
    patched.patch_model()
    weights = patched.model.diffusion_model.state_dict()
    for m, (a, b) in pairs.items():
        key = f"{m}.weight"
        assert rel(weights[key] - base[key], b @ a * (ALPHA / RANK)) < 1e-5, key
    patched.unpatch_model()

    with warnings_of("") as messages:
        sd.load_lora_for_models(patcher, None, load_file(str(alpha_run.runs["diffsynth", "f32"] / "lora.safetensors")), 1.0, 0.0)
    assert len([m for m in messages if "lora key not loaded" in m]) == 2 * len(pairs), messages
