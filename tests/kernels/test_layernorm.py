import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def reference(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def build(t, p):
    return ops.layernorm(t, p["x"], p["w"], p["b"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 5])
def test_layernorm_forward_matches_numpy(dtype, T):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, T, 70)) * 3 + 1, rng.standard_normal(70), rng.standard_normal(70)
    _, _, out = run_op(build, {"x": x, "w": w, "b": b}, dtype)
    np.testing.assert_allclose(out.data, reference(x, w, b), rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("shape", [(3, 70), (2, 1, 70)])  # the second: T = 1
def test_layernorm_backward_finite_differences(shape):
    rng = np.random.default_rng(1)
    # C = 70 spans two column blocks of the weight-grad reduction
    check_grads(build, {"x": rng.standard_normal(shape), "w": rng.standard_normal(70),
                        "b": rng.standard_normal(70)})


def test_layernorm_without_bias():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((4, 6)), rng.standard_normal(6)
    _, _, out = run_op(lambda t, p: ops.layernorm(t, p["x"], p["w"]), {"x": x, "w": w})
    np.testing.assert_allclose(out.data, reference(x, w, 0.0), rtol=1e-12, atol=1e-12)
    check_grads(lambda t, p: ops.layernorm(t, p["x"], p["w"]), {"x": x, "w": w})


def test_layernorm_rejects_mismatched_weight():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones((2, 4)), "w": np.ones(5)})
    with pytest.raises(ValueError, match="features"):
        ops.layernorm(Tape("cpu", np.float64), p["x"], p["w"])
