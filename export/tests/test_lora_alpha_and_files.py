"""alpha != rank through training (`train --lora-alpha 16` on the rank-8 tiny export whose
alpha is 8), both LoRA file formats and loaders that read them back; bf16 LoRA files
bit-exact against torch's round-to-nearest-even conversion.

References: PEFT's LoRA on DiffSynth's WanModel (alpha/r scaling), DiffSynth's
GeneralLoRALoader, ComfyUI's semantics written out here (W += up @ down · alpha / rank),
and `flowstep eval` reading both files back.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from independent import diffsynth_base, diffsynth_peft, final_state, flowstep, manifest, unflatten, velocity

from lora_run import ALPHA, RANK


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def probe(art):
    g = torch.Generator().manual_seed(9)
    m = manifest(art)["model"]
    return (torch.randn(1, m["in_dim"], 2, 8, 8, generator=g), torch.tensor([612.0]),
            torch.randn(1, m["text_len"], m["text_dim"], generator=g))


def test_exported_lora_forward_scales_by_alpha_over_rank(alpha_run):
    """The exported inference and training graphs (alpha = rank at export) fed
    lora_scale = 16/8 with the trained parameters equal PEFT (lora_alpha=16, r=8) on
    DiffSynth's WanModel."""
    art, trained = alpha_run.art, alpha_run.trained
    peft_model = diffsynth_peft(art, trained, alpha=ALPHA)
    x, t, ctx = probe(art)
    with torch.no_grad():
        want = velocity(peft_model, x, t, ctx)
        base = velocity(diffsynth_base(art), x, t, ctx)
    flat = torch.cat([trained[t_["key"]].reshape(-1) for t_ in manifest(art)["lora"]["tensors"]]).numpy()
    base_w = {k: v.numpy() for k, v in load_file(str(art / "base.safetensors")).items()}
    sess = ort.InferenceSession(str(art / "inference_model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {**base_w, "lora_params": flat, "lora_scale": np.array(ALPHA / RANK, np.float32),
             "x_t": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy()}
    (got,) = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    assert rel(want, base) > 1e-3, "the LoRA must change the output"
    assert rel(got, want) < 1e-5, f"inference graph vs PEFT alpha={ALPHA}, r={RANK}: {rel(got, want):.2e}"
    # Training graph: loss and gradient against PEFT autograd (loss written out here).
    target = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    weight = 0.8
    params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    loss = weight * ((velocity(peft_model, x, t, ctx) - target) ** 2).mean()
    loss.backward()
    want_grad = torch.cat([params[t_["key"]].grad.reshape(-1) for t_ in manifest(art)["lora"]["tensors"]])
    sess = ort.InferenceSession(str(art / "training_model.onnx"), providers=["CPUExecutionProvider"])
    feeds.update({"grad_accum": np.zeros_like(flat), "target": target.numpy(), "weight": np.array(weight, np.float32)})
    got_loss, got_grad = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    assert rel(got_loss, loss.detach()) < 1e-5
    assert rel(got_grad, want_grad) < 1e-4


@pytest.mark.parametrize("fmt", ["diffsynth", "comfyui"])
def test_lora_files_load_with_alpha_in_diffsynth_and_comfyui_semantics(alpha_run, fmt):
    from diffsynth.utils.lora.general import GeneralLoRALoader

    art = alpha_run.art
    file = load_file(str(alpha_run.runs[fmt, "f32"] / "lora.safetensors"))
    x, t, ctx = probe(art)
    with torch.no_grad():
        want = velocity(diffsynth_peft(art, alpha_run.trained, alpha=ALPHA), x, t, ctx)
    # DiffSynth's own loader (its semantics: B·A at scale 1, or ·alpha/rank with an alpha key).
    fused = diffsynth_base(art)
    GeneralLoRALoader(torch_dtype=torch.float32).fuse_lora_to_base_model(fused, file)
    with torch.no_grad():
        got = velocity(fused, x, t, ctx)
    assert rel(got, want) < 1e-5, f"{fmt} file through GeneralLoRALoader: {rel(got, want):.2e}"
    if fmt == "comfyui":
        # ComfyUI: W += up @ down · alpha / rank, alpha from the file, rank = down's rows.
        explicit = diffsynth_base(art)
        weights = dict(explicit.named_parameters())
        modules = {k.removeprefix("diffusion_model.").removesuffix(".alpha") for k in file if k.endswith(".alpha")}
        assert len(modules) == len(alpha_run.trained) // 2
        with torch.no_grad():
            for module in modules:
                down = file[f"diffusion_model.{module}.lora_A.weight"]
                up = file[f"diffusion_model.{module}.lora_B.weight"]
                alpha = file[f"diffusion_model.{module}.alpha"]
                assert alpha.item() == ALPHA
                weights[f"{module}.weight"] += up @ down * (alpha / down.shape[0])
            got = velocity(explicit, x, t, ctx)
        assert rel(got, want) < 1e-5, f"ComfyUI semantics: {rel(got, want):.2e}"


def test_lora_files_carry_the_trained_alpha(alpha_run):
    """Both f32 files hold the alpha trained with (ComfyUI's `.alpha` and kohya's
    ss_network_alpha; B·alpha/rank in DiffSynth's), so `flowstep eval --lora` of either gives
    exactly the loss training measured with its final parameters (summary.json, same data
    and seed), and that loss is not the base model's."""
    from safetensors import safe_open

    def eval_loss(lora=None):
        args = ["eval", "--artifacts", alpha_run.art, "--data", alpha_run.data, "--json", "--seed", 4]
        result = flowstep(*(args + (["--lora", lora] if lora else [])))
        return json.loads(result.stdout)["eval_loss"]

    for fmt in ("diffsynth", "comfyui"):
        with safe_open(str(alpha_run.runs[fmt, "f32"] / "lora.safetensors"), "pt") as f:
            meta = f.metadata()
        assert float(meta["ss_network_alpha"]) == ALPHA and float(meta["flowstep.lora_alpha"]) == ALPHA, fmt
    trained = json.loads((alpha_run.runs["comfyui", "f32"] / "summary.json").read_text())["eval_after"]
    a = eval_loss(alpha_run.runs["diffsynth", "f32"] / "lora.safetensors")
    b = eval_loss(alpha_run.runs["comfyui", "f32"] / "lora.safetensors")
    assert a == b == trained
    assert abs(a - eval_loss()) > 1e-4 * abs(a)


def bf16_rne(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).view(torch.int16)


@pytest.mark.parametrize("fmt", ["diffsynth", "comfyui"])
def test_bf16_lora_files_round_to_nearest_even(alpha_run, fmt):
    """Every value of the bf16 file is torch.bfloat16(float32 value): the trained
    parameters (B scaled by alpha/rank in DiffSynth files)."""
    file = load_file(str(alpha_run.runs[fmt, "bf16"] / "lora.safetensors"))
    prefix, infix = ("diffusion_model.", ".") if fmt == "comfyui" else ("", ".default.")
    for key, value in alpha_run.trained.items():
        name = prefix + key.replace(".default.", infix)
        expected = value * (ALPHA / RANK) if fmt == "diffsynth" and ".lora_B." in key else value
        assert file[name].dtype == torch.bfloat16
        assert torch.equal(file[name].view(torch.int16), bf16_rne(expected)), name


def test_bf16_rounding_of_ties(tmp_path):
    """Values exactly halfway between two bf16 numbers (both parities), just above and just
    below, and one that carries into the exponent. A starts at them; B starts at zero, so
    A's gradient is exactly zero on the first step and, with no weight decay, A is written
    unchanged after one step."""
    from independent import TINY

    init = load_file(str(TINY / "lora_init.safetensors"))
    g = torch.Generator().manual_seed(3)
    low_bits = torch.tensor([0x8000, 0x8000, 0x7FFF, 0x8001, 0x0000, 0x1234], dtype=torch.int32)
    crafted = {}
    for key, value in init.items():
        if ".lora_A." in key:
            bits = value.view(torch.int32)
            pick = low_bits[torch.randint(0, len(low_bits), bits.shape, generator=g)]
            bits = (bits & ~0xFFFF) | pick
            bits.view(-1)[0] = 0x3F7FFFFF  # rounds up to 1.0
            bits.view(-1)[1] = 0x3F808000  # tie, even below: stays 0x3F80
            bits.view(-1)[2] = 0x3F818000  # tie, odd below: up to 0x3F82
            value = bits.view(torch.float32)
        crafted[key] = value.contiguous()
    save_file(crafted, str(tmp_path / "init.safetensors"))
    data = tmp_path / "data"
    data.mkdir()
    save_file({"latents": torch.randn(16, 2, 8, 8, generator=g), "context": torch.randn(16, 64, generator=g)},
              str(data / "0.safetensors"))
    out = tmp_path / "run"
    flowstep("-q", "train", "--artifacts", TINY, "--data", data, "--out", out, "--steps", 1, "--lr", 1e-3,
             "--weight-decay", 0, "--init-lora", tmp_path / "init.safetensors")
    state = unflatten(TINY, final_state(out)["params"])
    file = load_file(str(out / "lora.safetensors"))
    comfy = {key: "diffusion_model." + key.replace(".default.", ".") for key in crafted}  # the default layout
    ties = 0
    for key, value in crafted.items():
        if ".lora_A." in key:
            assert torch.equal(state[key], value), "A must be unchanged for this test"
            ties += int(((value.view(torch.int32) & 0xFFFF) == 0x8000).sum())
        else:
            assert state[key].abs().max() > 0
        assert torch.equal(file[comfy[key]].view(torch.int16), bf16_rne(state[key])), key
    assert ties > 1000
    a0 = next(k for k in crafted if ".lora_A." in k)
    assert file[comfy[a0]].view(torch.int16).view(-1)[:3].tolist() == [0x3F80, 0x3F80, 0x3F82]
