import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import ops


def gelu_reference(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_forward_matches_numpy(dtype):
    x = np.linspace(-6, 6, 301).reshape(7, 43)
    _, _, out = run_op(lambda t, p: ops.gelu(t, p["x"]), {"x": x}, dtype)
    np.testing.assert_allclose(out.data, gelu_reference(x), rtol=1e-5, atol=1e-6)


def test_gelu_backward_finite_differences():
    x = np.random.default_rng(0).standard_normal((3, 5)) * 2
    check_grads(lambda t, p: ops.gelu(t, p["x"]), {"x": x})


def test_add_forward_and_backward():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    _, _, out = run_op(lambda t, p: ops.add(t, p["a"], p["b"]), {"a": a, "b": b})
    np.testing.assert_array_equal(out.data, a + b)
    check_grads(lambda t, p: ops.add(t, p["a"], p["b"]), {"a": a, "b": b})


def test_add_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        run_op(lambda t, p: ops.add(t, p["a"], p["b"]), {"a": np.ones((2, 3)), "b": np.ones((3, 2))})
