"""The gradient-norm graph flowstep embeds (assets/grad_sum_squares.onnx) is the one
flowstep_export.pipeline.grad_norm_graph writes, and computes Σ g² over any length."""

import numpy as np
import onnxruntime as ort

from flowstep_export.pipeline.grad_norm_graph import DEFAULT_OUT, graph_bytes


def test_committed_graph_is_what_the_script_writes():
    assert DEFAULT_OUT.read_bytes() == graph_bytes(), "run python -m flowstep_export.pipeline.grad_norm_graph and commit the file"


def test_graph_sums_squares_of_any_length():
    session = ort.InferenceSession(graph_bytes(), providers=["CPUExecutionProvider"])
    for n in (1, 7, 100_003):
        g = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        (got,) = session.run(None, {"grads": g})
        assert got.shape == ()
        np.testing.assert_allclose(got, np.sum(g.astype(np.float64) ** 2), rtol=1e-5)
