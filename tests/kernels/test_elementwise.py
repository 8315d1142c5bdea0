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


# ----------------------------------------------------------------------------- bias + GELU

def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_mlp_arrays(seed, lead=(2, 3), C=5, H=70, OC=4):
    rng = np.random.default_rng(seed)   # H = 70 spans two column blocks of the bias-grad reduction
    return {"x": rng.standard_normal(lead + (C,)), "w": rng.standard_normal((H, C)) * 0.7,
            "b": rng.standard_normal(H), "wp": rng.standard_normal((OC, H)) * 0.3, "bp": rng.standard_normal(OC)}


def gelu_mlp(t, p, biases=True):
    return ops.gelu_mlp(t, p["x"], p["w"], p["b"] if biases else None, p["wp"], p["bp"] if biases else None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_mlp_forward_matches_numpy(dtype):
    a = gelu_mlp_arrays(0)
    _, _, out = run_op(gelu_mlp, a, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.data, gelu_tanh(a["x"] @ a["w"].T + a["b"]) @ a["wp"].T + a["bp"], **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_mlp_equals_linear_gelu_linear(dtype):
    """Values and every grad as linear, gelu, linear (the fc matmul adds the bias in another order)."""
    a = gelu_mlp_arrays(1)
    results = []
    for build in (gelu_mlp,
                  lambda t, p: ops.linear(t, ops.gelu(t, ops.linear(t, p["x"], p["w"], p["b"])), p["wp"], p["bp"])):
        t, p, out = run_op(build, a, dtype)
        p.zero_grad()
        t.backward(out, np.random.default_rng(2).standard_normal(out.shape).astype(dtype))
        results.append((out.data.copy(), p.grad.copy()))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(results[0][0], results[1][0], **tol)
    np.testing.assert_allclose(results[0][1], results[1][1], **tol)


@pytest.mark.parametrize("lead", [(3,), (2, 1)])
def test_gelu_mlp_backward_finite_differences(lead):
    check_grads(gelu_mlp, gelu_mlp_arrays(3, lead))
    a = gelu_mlp_arrays(4, lead, H=6)
    _, _, out = run_op(lambda t, p: gelu_mlp(t, p, biases=False), a)
    np.testing.assert_allclose(out.data, gelu_tanh(a["x"] @ a["w"].T) @ a["wp"].T, rtol=1e-12, atol=1e-12)
    check_grads(lambda t, p: gelu_mlp(t, p, biases=False), {k: a[k] for k in ("x", "w", "wp")})


def test_gelu_mlp_rejects_bad_inputs():
    a = {**gelu_mlp_arrays(5, H=6), "v": np.ones(4)}
    t, p, _ = run_op(lambda t, p: p["x"], a)
    with pytest.raises(ValueError, match="features"):
        ops.gelu_mlp(t, ops.linear(t, p["x"], p["w"]), p["w"], p["b"], p["wp"])
    with pytest.raises(ValueError, match="fc_b has 4"):
        ops.gelu_mlp(t, p["x"], p["w"], p["v"], p["wp"])
    with pytest.raises(ValueError, match="must take the 6 outputs"):
        ops.gelu_mlp(t, p["x"], p["w"], p["b"], p["w"])
    with pytest.raises(ValueError, match="proj_b has 6"):
        ops.gelu_mlp(t, p["x"], p["w"], p["b"], p["wp"], p["b"])
    with pytest.raises(ValueError, match="2 dims"):
        ops.gelu_mlp(t, p["x"], p["b"], None, p["wp"])
    with pytest.raises(TypeError, match="Tensor"):
        ops.gelu_mlp(t, a["x"], p["w"], p["b"], p["wp"])
