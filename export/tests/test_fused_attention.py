"""`--attention fused` (issue 13): the com.flowstep operator pair kept in the graphs (and, in
float32, the tanh-GELU pair, issue 25), validated on the CPU through ONNX's reference evaluator
with the NumPy operators of reference_ops.py."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from flowstep_export.model.configs import get_config
from flowstep_export.reference.reference_ops import (FlashAttention, FlashAttentionGrad, GeluTanh, GeluTanhGrad, LayerNormGrad,
                                                     RmsNorm, RmsNormGrad, Rope)
from test_long_sequences import export_tiny

REPO = Path(__file__).resolve().parents[2]


def custom_ops(path: Path) -> collections.Counter:
    model = onnx.load(str(path))
    assert all(n.op_type != "Scan" for n in model.graph.node)
    assert {o.domain: o.version for o in model.opset_import}.get("com.flowstep") == 1
    return collections.Counter(n.op_type for n in model.graph.node if n.domain == "com.flowstep")


def test_reference_operators_equal_softmax_autograd():
    """The NumPy operators against autograd through plain softmax attention (float64), with
    Sq != Sk (cross-attention) and two heads."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, 2, 8, generator=g, dtype=torch.float64) for s in (7, 11, 11))
    do = torch.randn(1, 7, 2, 8, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    s = torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1]) * 0.3
    o_ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), leaves[2])
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves)

    f32 = [t.numpy().astype(np.float32) for t in (q, k, v, do)]
    o, lse = FlashAttention.create(scale=0.3).run(*f32[:3])
    assert lse.dtype == np.float32 and lse.shape == (1, 2, 7)
    np.testing.assert_allclose(o, o_ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(lse, torch.logsumexp(s, -1).detach().numpy(), atol=1e-5)
    grads = FlashAttentionGrad.create(scale=0.3).run(*f32[:3], o, lse, f32[3])
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_reference_gelu_operators_equal_torch_autograd():
    """The NumPy tanh-GELU pair against torch's F.gelu(approximate="tanh") and its autograd
    (float64), over the range where its gradient changes most and out to saturation."""
    # float32 values (the operators' dtype), differentiated in float64.
    x = torch.linspace(-12, 12, 2001).double().requires_grad_(True)
    dy = torch.randn(2001, generator=torch.Generator().manual_seed(3)).double()
    y_ref = torch.nn.functional.gelu(x, approximate="tanh")
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), [x])
    x32, dy32 = x.detach().numpy().astype(np.float32), dy.numpy().astype(np.float32)
    (y,) = GeluTanh.create().run(x32)
    (dx,) = GeluTanhGrad.create().run(x32, dy32)
    assert y.dtype == dx.dtype == np.float32
    # Evaluated in float64 and rounded to float32 once: an ulp (6e-8) of torch's float64. Below
    # 1e-12 (x < -7) both float64 evaluations are 1 + tanh cancelling to nothing.
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=2e-7, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref.numpy(), rtol=2e-7, atol=1e-12)


def test_reference_rms_norm_operators_equal_torch_autograd():
    """The NumPy RMSNorm pair against Wan's RMSNorm written with torch's stock ops and its
    autograd (float64), rows of different scales."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 5, 64, generator=g) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]).double().requires_grad_(True)
    weight = torch.randn(64, generator=g).double()
    dy = torch.randn(3, 5, 64, generator=g).double()
    rstd_ref = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    y_ref = x * rstd_ref * weight
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), [x])
    f32 = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    y, rstd = RmsNorm.create(epsilon=1e-6).run(f32(x), f32(weight))
    (dx,) = RmsNormGrad.create().run(f32(x), f32(weight), rstd, f32(dy))
    assert y.dtype == dx.dtype == rstd.dtype == np.float32 and rstd.shape == (3, 5, 1)
    # float64 evaluation of float32 inputs, rounded once; the float32 rounding of the inputs
    # themselves (x, weight, dy: 6e-8 relative each) moves the results by a few 1e-7.
    for got, want in ((y, y_ref), (rstd, rstd_ref), (dx, dx_ref)):
        want = want.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_reference_rope_equals_the_models_rope_and_its_autograd():
    """The NumPy Rope against model.rope_apply's standard-op form (on Wan's tables for a 2x3x4
    grid) and its autograd, which is the same rotation by the negated angle."""
    from flowstep_export.model import model as wan

    tables = wan.rope_tables(32)
    cos, sin = wan.rope_grid(tables, 2, 3, 4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 2 * 32, generator=g, requires_grad=True)
    dy = torch.randn(2, 24, 2 * 32, generator=g)
    y_ref = wan.rope_apply(x, cos, sin, num_heads=2)
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), [x])
    (y,) = Rope.create().run(x.detach().numpy(), cos.numpy(), sin.numpy())
    (dx,) = Rope.create().run(dy.numpy(), cos.numpy(), -sin.numpy())
    # float32 products and sums (torch) against float64 rounded once: values of order 3.
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref.numpy(), rtol=0, atol=1e-6)


def test_reference_layer_norm_grad_equals_torch_autograd():
    """The NumPy LayerNormGrad against F.layer_norm's autograd (float64), with and without an
    affine weight, rows whose mean is far from zero (the centring must not cancel)."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 5, 64, generator=g) + torch.tensor([0.0, 50.0, -3.0])[:, None, None]).double().requires_grad_(True)
    dy = torch.randn(3, 5, 64, generator=g).double()
    for weight in (None, torch.randn(64, generator=g).double()):
        (dx_ref,) = torch.autograd.grad((torch.nn.functional.layer_norm(x, [64], weight, None, 1e-6) * dy).sum(), [x])
        mean = x.detach().mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.detach().var(-1, unbiased=False, keepdim=True) + 1e-6)
        f32 = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
        w = np.ones(64, np.float32) if weight is None else f32(weight)
        (dx,) = LayerNormGrad.create().run(f32(x), f32(mean), f32(rstd), f32(dy), w)
        # float32 rounding of the inputs (x up to 50: 3e-6 absolute) moves dx by ~1e-6 of its scale.
        np.testing.assert_allclose(dx, dx_ref.numpy(), rtol=0, atol=2e-5 * float(dx_ref.abs().max()))


def test_fused_export_validates_against_autograd(tmp_path):
    out, report = export_tiny(tmp_path, attention="fused", graphs=("training_model", "inference_model"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["attention"] == {"impl": "fused", "domain": "com.flowstep",
                                                 "operators": ["FlashAttention", "FlashAttentionGrad"]}
    # Loss, gradient and velocity at the example latent and one larger in every axis; the
    # float32 agreement seen is ~4e-7, as for chunked graphs.
    assert sorted(report) == sorted(f"{o}@{t}" for o in ("training.loss", "training.grad", "inference.velocity")
                                    for t in ("3x8x8", "4x10x10"))
    assert all(v["max_rel"] < 1e-5 for v in report.values()), report
    assert manifest["training"]["operators"] == ["FlashAttention", "FlashAttentionGrad", "GeluTanh", "GeluTanhGrad",
                                                 "LayerNormGrad", "RmsNorm", "RmsNormGrad", "Rope"]
    layers = get_config("tiny").num_layers
    attentions = 2 * layers  # self + cross per block
    # One GELU per block's FFN and one in the text embedding, which has no gradient (frozen);
    # q and k norms of self- and cross-attention, each differentiated (LoRA on q and k); RoPE
    # on self-attention's q and k, and again (the inverse rotation) on their gradients;
    # LayerNorm's backward for norm1, norm2, norm3 per block and the head's norm, except block
    # 0's norm1, whose input has nothing trainable before it.
    assert custom_ops(out / "training_model.onnx") == {"FlashAttention": attentions, "FlashAttentionGrad": attentions,
                                                       "GeluTanh": layers + 1, "GeluTanhGrad": layers,
                                                       "RmsNorm": 4 * layers, "RmsNormGrad": 4 * layers, "Rope": 4 * layers,
                                                       "LayerNormGrad": 3 * layers}
    assert custom_ops(out / "inference_model.onnx") == {"FlashAttention": attentions, "GeluTanh": layers + 1,
                                                        "RmsNorm": 4 * layers, "Rope": 2 * layers}


def test_committed_fused_twin_matches_committed_tiny():
    """models/tiny-fused differs from models/tiny in the attention only (the Rust tests train both)."""
    fused = json.loads((REPO / "models/tiny-fused/artifacts/manifest.json").read_text())
    chunked = json.loads((REPO / "models/tiny/artifacts/manifest.json").read_text())
    assert fused["training"]["attention"]["impl"] == "fused"
    for key in ("model", "lora", "base_weights", "scheduler"):
        assert fused[key] == chunked[key], key
    for f in ("base.safetensors", "lora_init.safetensors", "optimizer_model.onnx"):
        assert fused["files"][f] == chunked["files"][f], f
    assert custom_ops(REPO / "models/tiny-fused/artifacts/training_model.onnx")["FlashAttentionGrad"] > 0


def test_fused_bf16_export_validates(tmp_path):
    """bf16 operator inputs (the CUDA kernels' dtype) through the reference evaluator: within
    validate.BF16_RATIO of PyTorch's own bf16 error, and really bf16 (far from exact)."""
    out, report = export_tiny(tmp_path, attention="fused", precision="bfloat16", graphs=("training_model",))
    assert report["training.grad@3x8x8"]["max_rel"] > 1e-4
    # No tanh-GELU operator in bf16: GPU providers have no kernel for it.
    fused = [n for n in onnx.load(str(out / "training_model.onnx")).graph.node if n.domain == "com.flowstep"]
    assert fused and all(n.op_type in ("FlashAttention", "FlashAttentionGrad") for n in fused)
    assert json.loads((out / "manifest.json").read_text())["training"]["operators"] == ["FlashAttention", "FlashAttentionGrad"]


def test_committed_pair_models_are_current_and_chain_the_operators():
    """tests/golden/flash_attention_pair_*.onnx (the GPU parity test's models) are what
    reference_ops.pair_model writes today, and on the reference evaluator they compute softmax
    attention and its gradient at Wan's scale (fp16 inputs, float32 autograd on the same values)."""
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    from flowstep_export.reference.reference_ops import NEW_OPS, pair_model

    scale = 128 ** -0.5
    for name, elem in (("bf16", TensorProto.BFLOAT16), ("fp16", TensorProto.FLOAT16)):
        committed = (REPO / f"tests/golden/flash_attention_pair_{name}.onnx").read_bytes()
        assert committed == pair_model(elem, scale).SerializeToString(), f"regenerate {name} (scripts/regenerate_models.sh)"
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, s, 2, 128, generator=g).half() for s in (5, 9, 9))
    do = torch.randn(1, 5, 2, 128, generator=g).half()
    got = ReferenceEvaluator(pair_model(TensorProto.FLOAT16, scale), new_ops=NEW_OPS).run(
        None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "do": do.numpy()})
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    p = (torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1]) * scale).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, leaves[2])
    grads = torch.autograd.grad((o * do.float()).sum(), leaves)
    for out, want in zip(got[:1] + got[2:], [o, *grads]):
        np.testing.assert_allclose(out.astype(np.float32), want.detach().numpy(), rtol=0, atol=4e-3 * float(want.abs().max()))


def test_fused_checkpointed_image_variants_validate(tmp_path):
    """Fused attention is the default for float32 exports, so it meets every variant: the I2V
    model (text and CLIP-image cross-attention, `y`) and TI2V (per-token timesteps), each with
    gradient checkpointing (the forward's operators run again inside the backward), validated
    against PyTorch autograd through plain softmax attention like every export."""
    import logging

    from flowstep_export.pipeline.export import ExportOptions, export_artifacts
    from flowstep_export.pipeline.validate import validate_artifacts
    from conftest import TINY_LORA

    logging.getLogger("flowstep_export").setLevel(logging.ERROR)
    for preset in ("tiny-i2v", "tiny-ti2v"):
        out = tmp_path / preset
        opts = ExportOptions(out=out, lora=TINY_LORA, ship_base=True, seed=0, attention="fused",
                             gradient_checkpointing=True, graphs=("training_model",))
        export_artifacts(get_config(preset), opts)
        report = validate_artifacts(out, get_config(preset), opts)
        assert report and all(v["max_rel"] < 1e-5 for v in report.values()), (preset, report)
        ops = custom_ops(out / "training_model.onnx")
        # Checkpointing recomputes each block's forward, attention included, before its backward.
        assert ops["FlashAttention"] == 2 * ops["FlashAttentionGrad"] > 0, (preset, ops)
        assert ops["GeluTanh"] == 2 * ops["GeluTanhGrad"] + 1 > 1, (preset, ops)
        # I2V's image key norm (norm_k_img) has no gradient: no LoRA on its path.
        image_key_norms = get_config(preset).num_layers if preset == "tiny-i2v" else 0
        assert ops["RmsNorm"] == 2 * (ops["RmsNormGrad"] + image_key_norms) > 0, (preset, ops)
        # Self-attention's q and k: forward, its recompute, and the gradients' inverse rotation.
        assert ops["Rope"] == 6 * get_config(preset).num_layers, (preset, ops)
