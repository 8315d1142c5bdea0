import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


@pytest.mark.parametrize("T", [1, 3])
def test_mul_forward_and_backward(T):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((2, T, 4)), "b": rng.standard_normal((2, T, 4))}
    _, _, out = run_op(lambda t, p: ops.mul(t, p["a"], p["b"]), arrays)
    np.testing.assert_array_equal(out.data, arrays["a"] * arrays["b"])
    check_grads(lambda t, p: ops.mul(t, p["a"], p["b"]), arrays)


def test_scale_by_constant():
    x = np.random.default_rng(1).standard_normal((2, 1, 5))
    _, _, out = run_op(lambda t, p: ops.scale(t, p["x"], 2.5), {"x": x})
    np.testing.assert_allclose(out.data, 2.5 * x)
    check_grads(lambda t, p: ops.scale(t, p["x"], -0.75), {"x": x})


def test_scale_by_learned_scalar():
    rng = np.random.default_rng(2)
    arrays = {"x": rng.standard_normal((2, 3, 5)), "s": np.array([1.7])}
    _, _, out = run_op(lambda t, p: ops.scale(t, p["x"], p["s"]), arrays)
    np.testing.assert_allclose(out.data, 1.7 * arrays["x"])
    check_grads(lambda t, p: ops.scale(t, p["x"], p["s"]), arrays)


@pytest.mark.parametrize("T", [1, 3])
def test_concat_forward_and_backward(T):
    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal((2, T, 3)), "b": rng.standard_normal((2, T, 5))}
    _, _, out = run_op(lambda t, p: ops.concat(t, p["a"], p["b"]), arrays)
    np.testing.assert_array_equal(out.data, np.concatenate([arrays["a"], arrays["b"]], -1))
    check_grads(lambda t, p: ops.concat(t, p["a"], p["b"]), arrays)


def test_elementwise_rejects_bad_input():
    _, p, _ = run_op(lambda t, p: p["a"], {"a": np.ones((2, 3)), "b": np.ones((3, 3)), "s": np.ones(2),
                                           "e": np.ones((2, 0))})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="differ"):
        ops.mul(t, p["a"], p["b"])
    with pytest.raises(ValueError, match="leading"):
        ops.concat(t, p["a"], p["b"])
    with pytest.raises(ValueError, match="at least one feature"):
        ops.concat(t, p["a"], p["e"])
    with pytest.raises(ValueError, match=r"\(1,\)"):
        ops.scale(t, p["a"], p["s"])
    with pytest.raises(TypeError, match="finite"):
        ops.scale(t, p["a"], float("nan"))


def test_residual_in_place_matches_add_and_finite_differences():
    """residual_(h, x) = x + h in h's memory: no new activation, the same values and grads as add."""
    rng = np.random.default_rng(3)
    arrays = {"x": rng.standard_normal((2, 3, 4)), "w": rng.standard_normal((4, 4)), "r": rng.standard_normal((2, 3, 4))}
    t, p, out = run_op(lambda t, p: ops.residual_(t, ops.linear(t, p["x"], p["w"]), p["r"]), arrays)
    np.testing.assert_allclose(out.data, arrays["x"] @ arrays["w"].T + arrays["r"], rtol=1e-12)
    top = t.acts.top
    t.reset()
    h = ops.linear(t, p["x"], p["w"])
    assert ops.residual_(t, h, p["r"]) is h and t.acts.top == top
    check_grads(lambda t, p: ops.residual_(t, ops.linear(t, p["x"], p["w"]), p["r"]), arrays)
    with pytest.raises(ValueError, match="op output"):
        run_op(lambda t, p: ops.residual_(t, p["r"], p["x"]), arrays)
    with pytest.raises(ValueError, match="differ"):
        run_op(lambda t, p: ops.residual_(t, ops.linear(t, p["x"], p["w"]), p["w"]), arrays)
