"""The graphs' loss against the SFT loss written out here (not flowstep_export's sft_loss),
with loss weights != 1; and the committed tiny artifacts against a fresh export."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from independent import ROOT, TINY, manifest


def sessions(art):
    return {name: ort.InferenceSession(str(art / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            for name in ("training_model", "eval_model", "inference_model")}


def run(sess, feeds):
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


@pytest.mark.parametrize("which", ["committed", "fresh"])
def test_graph_loss_is_weight_times_mean_squared_error(which, request):
    """On the committed tiny graphs and on a fresh export from today's exporter (which the
    drift test below compares file by file, but a weight bug in the exporter must fail here
    by itself, naming the loss)."""
    art = TINY if which == "committed" else request.getfixturevalue("tiny_artifacts")
    rng = np.random.default_rng(0)
    info = manifest(art)["lora"]
    init = load_file(str(art / "lora_init.safetensors"))
    flat = np.concatenate([
        (init[t["key"]] if ".lora_A." in t["key"] else 0.05 * rng.standard_normal(t["shape"])).astype(np.float32).ravel()
        for t in info["tensors"]])
    feeds = {**load_file(str(art / "base.safetensors")), "lora_params": flat, "grad_accum": np.zeros_like(flat),
             "lora_scale": np.array(info["alpha"] / info["rank"], np.float32),
             "x_t": rng.standard_normal((1, 16, 2, 8, 8)).astype(np.float32), "timestep": np.array([700.0], np.float32),
             "context": rng.standard_normal((1, 16, 64)).astype(np.float32),
             "target": rng.standard_normal((1, 16, 2, 8, 8)).astype(np.float32)}
    s = sessions(art)
    (v,) = run(s["inference_model"], feeds)
    mse = np.mean((v.astype(np.float64) - feeds["target"].astype(np.float64)) ** 2)
    grads = {}
    for w in (0.37, 1.9, 0.0):
        feeds["weight"] = np.array(w, np.float32)
        loss, grads[w] = run(s["training_model"], feeds)
        (eval_loss,) = run(s["eval_model"], feeds)
        want = np.float32(w) * mse
        assert abs(loss - want) <= 1e-5 * max(want, 1e-30) + (1e-12 if w == 0 else 0), (w, loss, want)
        assert abs(eval_loss - want) <= 1e-5 * max(want, 1e-30) + (1e-12 if w == 0 else 0), (w, eval_loss, want)
    # ∂(w·L)/∂θ = w·∂L/∂θ: linear in the weight, zero at weight 0.
    g1, g2 = grads[0.37].astype(np.float64), grads[1.9].astype(np.float64)
    assert np.abs(g1).max() > 0
    assert np.max(np.abs(g1 * 1.9 - g2 * 0.37)) <= 1e-5 * np.abs(g2 * 0.37).max()
    assert not grads[0.0].any()


def without_timings(m: dict) -> dict:
    m = dict(m)
    m.pop("export", None)  # export seconds and the --base path: not part of the artifacts
    # The shipped base's bytes depend on PyTorch's CPU kernels (below); its values are compared there.
    m["files"] = {k: v for k, v in m["files"].items() if k != "base.safetensors"}
    return m


def test_committed_tiny_artifacts_equal_a_fresh_export(tiny_artifacts):
    """models/tiny/artifacts was written by the current exporter (rank 8, attention chunk 12,
    seed 0, shipped base): a change to the export code that changes the graphs must come with
    new artifacts (and goldens), or the Rust tests read stale files. Regenerate with
    scripts/regenerate_models.sh."""
    committed = sorted(p.name for p in TINY.iterdir())
    assert committed == sorted(p.name for p in tiny_artifacts.iterdir())
    for name in committed:
        if name == "manifest.json":
            fresh = without_timings(json.loads((tiny_artifacts / name).read_text()))
            assert without_timings(json.loads((TINY / name).read_text())) == fresh
        elif name == "base.safetensors":
            assert_same_random_init(load_file(str(TINY / name)), load_file(str(tiny_artifacts / name)))
        else:
            assert (TINY / name).read_bytes() == (tiny_artifacts / name).read_bytes(), f"{name} differs from a fresh export"


def assert_same_random_init(committed: dict, fresh: dict):
    """The shipped base is the model's seeded random init, drawn by PyTorch's CPU kernels, which
    round differently per instruction set (ATEN_CPU_CAPABILITY=default vs avx2 changes 1,597 of
    its values). uniform_'s `from + (to - from)·u` is one fma or a multiply and an add: 1 ulp of
    the bound; normal_'s Box-Muller (log, sqrt, cos, each within ~2 ulps, vectorised or scalar)
    a few ulps of |z|. So each tensor may move by up to 8 ulps of its largest magnitude (measured:
    5.4); a different seed, init or shape moves it by far more than that."""
    assert sorted(committed) == sorted(fresh)
    for k, want in committed.items():
        got = fresh[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        scale = np.spacing(np.abs(want).max().astype(want.dtype)) if want.size else 0
        err = np.abs(got.astype(np.float64) - want).max() if want.size else 0
        assert err <= 8 * scale, f"base.safetensors {k}: differs by {err:.2e} from the committed one ({err / scale:.1f} ulps)"


def test_committed_goldens_equal_regenerated_ones():
    """models/tiny/golden.safetensors is what `python -m flowstep_export.reference.goldens` computes from
    the committed artifacts today (to float32 summation-order noise: thread counts differ)."""
    from flowstep_export.reference.goldens import make_goldens
    from flowstep_export.pipeline.validate import stock_reference

    committed = load_file(str(ROOT / "models" / "tiny" / "golden.safetensors"))
    with stock_reference():  # as `python -m flowstep_export.reference.goldens` computes them
        fresh = make_goldens(TINY)
    assert sorted(committed) == sorted(fresh)
    for k, v in fresh.items():
        want = v.numpy().astype(np.float64)
        err = np.abs(committed[k] - want).max() / max(np.abs(want).max(), 1e-30)
        assert err < 1e-5, f"{k}: rel err {err:.1e}"
