"""Validation that is part of every export: ONNX Runtime against PyTorch eager autograd
on the same inputs, per output, collecting every mismatch before raising."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file

from ..model import model as wan
from .steps import adamw, sft_loss


@dataclasses.dataclass
class Comparison:
    name: str
    max_abs: float
    max_rel: float  # max |a-b| / max |b|
    ok: bool


def compare(name: str, got: np.ndarray, expected: np.ndarray, rtol: float) -> Comparison:
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return Comparison(name, float("inf"), float("inf"), False)
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    rel = diff / max(scale, 1e-30)
    return Comparison(name, diff, rel, bool(np.all(np.isfinite(got))) and rel <= rtol)


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def stock_reference():
    """Eager references use explicit softmax attention and PyTorch's own norms and GELU, not
    the operator pair and hand-written backwards under test."""
    saved = wan.ATTENTION, wan.POINTWISE
    wan.ATTENTION, wan.POINTWISE = "math", "stock"
    try:
        yield
    finally:
        wan.ATTENTION, wan.POINTWISE = saved


def eager_loss_and_grads(model, lora_keys, inputs) -> tuple[float, np.ndarray]:
    """Reference: eager PyTorch autograd through the nn.Module with requires_grad LoRA."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for k in lora_keys:
        params[k].requires_grad_(True)
    with stock_reference():  # the backward too: checkpointing recomputes blocks there
        velocity = model(*model_inputs(model.config, inputs))
        loss = sft_loss(velocity, torch.as_tensor(inputs["target"]), torch.as_tensor(inputs["weight"]), model.config.first_frame)
        loss.backward()
    grad = torch.cat([params[k].grad.reshape(-1) for k in lora_keys])
    for k in lora_keys:
        params[k].requires_grad_(False)
    return float(loss), grad.numpy()


def model_inputs(config, batch) -> list[torch.Tensor]:
    """The model's positional inputs from a batch dict: x_t, timestep, context, conditioning."""
    names = ["x_t", "timestep", "context", *(name for name, _ in config.conditioning)]
    return [torch.as_tensor(batch[n]) for n in names]


def adamw_reference(params, grads, m, v, steps: int, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """`steps` torch.optim.AdamW steps on one flat parameter with fixed gradients."""
    p = torch.nn.Parameter(torch.tensor(params))
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    for g in grads[:steps]:
        p.grad = torch.tensor(g)
        opt.step()
    state = opt.state[p]
    return p.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy()


def manifest_matches_graphs(artifacts: Path) -> list[str]:
    """Every graph's inputs/outputs (names, dtypes, shapes) as the manifest lists them."""
    import onnx

    from .manifest import graph_signature, sha256

    manifest = json.loads((artifacts / "manifest.json").read_text())
    problems = []
    for name, sig in manifest["graphs"].items():
        actual = graph_signature(artifacts / sig["file"])
        if actual != sig:
            problems.append(f"{name}: manifest signature differs from the graph")
        onnx.checker.check_model(str(artifacts / sig["file"]))
    for file, digest in manifest["files"].items():
        if sha256(artifacts / file) != digest:
            problems.append(f"{file}: sha256 differs")
    keys = [t["key"] for t in manifest["lora"]["tensors"]]
    init = load_file(str(artifacts / "lora_init.safetensors"))
    if sorted(init) != sorted(keys):
        problems.append("lora_init.safetensors keys differ from the manifest")
    return problems


def ort_value(array: np.ndarray) -> ort.OrtValue:
    """ONNX Runtime's Python API takes no ml_dtypes float8 arrays: pass their bytes typed."""
    import ml_dtypes
    import onnx

    if array.dtype == ml_dtypes.float8_e4m3fn:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8), onnx.TensorProto.FLOAT8E4M3FN)
    return ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"))  # ascontiguousarray makes 0-d 1-d


def base_arrays(model) -> dict[str, np.ndarray]:
    """The base weights as the graphs take them: bf16 and fp8 as ml_dtypes arrays."""
    import ml_dtypes

    from ..model.fp8 import FP8
    from ..model.lora import base_state

    def array(v):
        if v.dtype == FP8:
            return v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        if v.dtype == torch.bfloat16:
            return v.float().numpy().astype(ml_dtypes.bfloat16)
        return v.numpy()
    return {k: array(v) for k, v in base_state(model).items()}


def graph_runner(out: Path, precision: str, attention: str = "chunked"):
    """name, feed -> outputs. float32 graphs run on ONNX Runtime; bfloat16 graphs on ONNX's
    reference evaluator, since ONNX Runtime's CPU provider has no bf16 kernels, and so do
    fused graphs, with NumPy implementations of the com.flowstep operators (stock ONNX
    Runtime has none; flowstep registers its own)."""
    if precision == "float32" and attention == "chunked":
        def run(name, feed):
            sess = session(out / f"{name}.onnx")
            values = {i.name: ort_value(feed[i.name]) for i in sess.get_inputs()}
            return [v.numpy() for v in sess.run_with_ort_values(None, values)]
        return run
    from onnx.reference import ReferenceEvaluator

    from ..reference.reference_ops import NEW_OPS

    def run(name, feed):
        evaluator = ReferenceEvaluator(str(out / f"{name}.onnx"), new_ops=NEW_OPS)
        return evaluator.run(None, {n: feed[n] for n in evaluator.input_names})
    return run


# bf16 graphs are compared with a float32 PyTorch reference on the same (bf16) weights and may
# differ from it by at most this multiple of PyTorch's own bf16 error, plus BF16_FLOOR (for
# outputs where PyTorch's bf16 error happens to be tiny). Measured on tiny: ONNX bf16 0.0099
# and PyTorch bf16 0.0091 of the gradient's max from float32 (ratio 1.1), loss 1e-4 and 3e-4.
BF16_RATIO = 2.0
BF16_FLOOR = 2e-3


def validate_artifacts(out: Path, config, options, rtol: float = 1e-4) -> dict:
    """The exported graphs against eager PyTorch on the export's example inputs; raises
    with every mismatch.

    float32: rtol (relative to the largest magnitude of each output) is 1e-4: both sides are
    float32 with different summation orders and fused kernels; agreement observed is ~1e-6,
    so a real error (a wrong op, a dropped term) is far above it.
    bfloat16: see BF16_RATIO."""
    import copy

    from .export import build_model, example_inputs
    from ..model.lora import lora_state, set_lora_scale
    from .steps import flat_layout, flatten

    model, lora_names = build_model(config, options)
    layout = flat_layout(lora_state(model), lora_names)
    lora_flat = flatten(lora_state(model), layout)
    # A non-zero B, so gradients of A are non-zero too.
    lora_flat = lora_flat + 0.01 * torch.randn(lora_flat.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in layout:
            dict(model.named_parameters())[t.key].copy_(lora_flat[t.offset:t.offset + t.numel].reshape(t.shape))
    # A scale other than the export's default alpha/rank, so a graph that ignored its
    # `lora_scale` input would fail.
    lora_scale = 1.5 * options.lora.scaling
    set_lora_scale(model, lora_scale)
    bf16 = options.precision == "bfloat16"
    model32 = copy.deepcopy(model) if bf16 else model
    if bf16:  # fp8 weights stay fp8, dequantized to float32 by the reference
        for t in [*model32.parameters(), *model32.buffers()]:
            if t.dtype == torch.bfloat16:
                t.data = t.data.float()
    base = base_arrays(model)
    run = graph_runner(out, options.precision, options.attention)
    keys = [t.key for t in layout]
    lora = {"lora_params": lora_flat.numpy(), "lora_scale": np.array(lora_scale, dtype=np.float32)}

    def velocity(m, batch):
        with torch.no_grad(), stock_reference():
            return m(*model_inputs(config, batch)).float().numpy()

    def check(name, got, reference32, reference_low):
        if not bf16:
            return compare(name, got, reference32, rtol)
        own = compare(name, reference_low, reference32, 1.0).max_rel
        return compare(name, got, reference32, BF16_RATIO * own + BF16_FLOOR)

    results = []
    manifest = json.loads((out / "manifest.json").read_text())
    graphs = manifest["graphs"]
    # The example size and one larger in every latent axis: a graph whose frames, height or
    # width were fixed during tracing fails the second (docs/DESIGN.md §2-3: dynamic axes).
    f, h, w = config.example_latent
    for latent in ((f, h, w), (f + 1, h + 2, w + 2)):
        tag = "x".join(map(str, latent))
        batch = {k: v.numpy() for k, v in example_inputs(config, options.seed, latent).items()}
        try:
            if "training_model" in graphs:
                ref_loss, ref_grad = eager_loss_and_grads(model32, keys, batch)
                low_loss, low_grad = eager_loss_and_grads(model, keys, batch) if bf16 else (ref_loss, ref_grad)
                accum = np.zeros(lora_flat.numel(), dtype=np.float32)
                loss, accum_out = run("training_model", {**base, **batch, **lora, "grad_accum": accum})
                results += [check(f"training.loss@{tag}", loss, ref_loss, low_loss),
                            check(f"training.grad@{tag}", accum_out - accum, ref_grad, low_grad)]
            if "inference_model" in graphs:
                (got,) = run("inference_model", {**base, **batch, **lora})
                results.append(check(f"inference.velocity@{tag}", got, velocity(model32, batch), velocity(model, batch) if bf16 else None))
        except Exception as e:  # onnxruntime's errors are not RuntimeErrors
            if isinstance(e, RuntimeError) and "disagrees" in str(e):
                raise
            raise RuntimeError(f"cannot run the exported graphs at latent {tag}: {str(e).splitlines()[0][:300]}") from e
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError("ONNX Runtime disagrees with PyTorch: " + "; ".join(f"{r.name} rel {r.max_rel:.2e}" for r in failed))
    return {r.name: {"max_abs": r.max_abs, "max_rel": r.max_rel} for r in results}
