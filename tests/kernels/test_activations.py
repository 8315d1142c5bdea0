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


@pytest.mark.parametrize("T", [1, 3])
def test_add_forward_and_backward(T):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, T, 4)), rng.standard_normal((2, T, 4))
    _, _, out = run_op(lambda t, p: ops.add(t, p["a"], p["b"]), {"a": a, "b": b})
    np.testing.assert_array_equal(out.data, a + b)
    check_grads(lambda t, p: ops.add(t, p["a"], p["b"]), {"a": a, "b": b})


def test_add_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        run_op(lambda t, p: ops.add(t, p["a"], p["b"]), {"a": np.ones((2, 3)), "b": np.ones((3, 2))})


from math import erf  # noqa: E402

import nt  # noqa: E402

POINTWISE = {
    "silu": (ops.silu, lambda x: x / (1 + np.exp(-x))),
    "sigmoid": (ops.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "gelu_exact": (lambda t, x: ops.gelu(t, x, approximate=False),
                   lambda x: 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))),
}


@pytest.mark.parametrize("name", sorted(POINTWISE))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pointwise_forward_matches_numpy(name, dtype):
    op, ref = POINTWISE[name]
    x = np.linspace(-30, 30, 301).reshape(7, 43)  # far tails too: sigmoid must not overflow
    _, _, out = run_op(lambda t, p: op(t, p["x"]), {"x": x}, dtype)
    assert np.all(np.isfinite(out.data))
    np.testing.assert_allclose(out.data, ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_pointwise_backward_finite_differences(name):
    op, _ = POINTWISE[name]
    x = np.random.default_rng(3).standard_normal((3, 5)) * 2
    check_grads(lambda t, p: op(t, p["x"]), {"x": x})


GLU = {"silu": lambda g: g / (1 + np.exp(-g)), "gelu_tanh": gelu_reference,
       "gelu": lambda g: 0.5 * g * (1 + np.vectorize(erf)(g / np.sqrt(2)))}


@pytest.mark.parametrize("act", sorted(GLU))
@pytest.mark.parametrize("T", [1, 3])
def test_glu_forward_matches_numpy(act, T):
    x = np.random.default_rng(4).standard_normal((2, T, 10)) * 2
    _, _, out = run_op(lambda t, p: ops.glu(t, p["x"], act), {"x": x})
    np.testing.assert_allclose(out.data, GLU[act](x[..., :5]) * x[..., 5:], rtol=1e-12, atol=1e-12)


def test_swiglu_geglu_are_glu():
    x = np.random.default_rng(5).standard_normal((3, 8))
    _, _, a = run_op(lambda t, p: ops.swiglu(t, p["x"]), {"x": x})
    _, _, b = run_op(lambda t, p: ops.geglu(t, p["x"]), {"x": x})
    np.testing.assert_allclose(a.data, GLU["silu"](x[:, :4]) * x[:, 4:], rtol=1e-12)
    np.testing.assert_allclose(b.data, GLU["gelu_tanh"](x[:, :4]) * x[:, 4:], rtol=1e-12)


@pytest.mark.parametrize("act", sorted(GLU))
def test_glu_backward_finite_differences(act):
    x = np.random.default_rng(6).standard_normal((2, 3, 8))
    check_grads(lambda t, p: ops.glu(t, p["x"], act), {"x": x})


def test_glu_rejects_bad_input():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones((2, 5))})
    t = nt.Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="even"):
        ops.glu(t, p["x"])
    with pytest.raises(ValueError, match="act"):
        ops.glu(t, p["x"], "relu")
    with pytest.raises(TypeError, match="Tensor"):
        ops.silu(t, np.ones(3))


@pytest.mark.parametrize("T", [1, 4])
def test_softmax_forward_and_backward(T):
    x = np.random.default_rng(7).standard_normal((2, T, 6)) * 3
    _, _, out = run_op(lambda t, p: ops.softmax(t, p["x"]), {"x": x})
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(out.data, e / e.sum(-1, keepdims=True), rtol=1e-12)
    check_grads(lambda t, p: ops.softmax(t, p["x"]), {"x": x})


def test_softmax_is_finite_for_huge_logits():
    _, _, out = run_op(lambda t, p: ops.softmax(t, p["x"]), {"x": np.array([[1e30, 0.0, -1e30]])}, np.float32)
    np.testing.assert_array_equal(out.data, [[1.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- glu_linear (GLU output recomputed)

GL_PARTS = np.array([[0, 3], [4, 1]], dtype=np.int64)   # two adapters on the 5 outputs, r = 2


def glu_linear_arrays(T, seed=12):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, T, 8)), "W": rng.standard_normal((5, 4)),
            "A": rng.standard_normal((4, 4)), "B": rng.standard_normal((4, 2))}


def fused_mlp(act, adapted):
    return lambda t, p: ops.glu_linear(t, p["x"], p["W"], act, (p["A"], p["B"], 0.6, GL_PARTS) if adapted else None)


def unfused_mlp(act, adapted):
    def build(t, p):
        g = ops.glu(t, p["x"], act)
        out = ops.linear(t, g, p["W"])
        return ops.lora_(t, out, g, p["A"], p["B"], 0.6, GL_PARTS) if adapted else out
    return build


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("adapted", [False, True])
def test_glu_linear_equals_glu_then_linear(act, adapted):
    arrays = glu_linear_arrays(3)
    results = []
    for build in (fused_mlp(act, adapted), unfused_mlp(act, adapted)):
        t, p, out = run_op(build, arrays)
        dout = np.random.default_rng(1).standard_normal(out.shape)
        p.zero_grad()
        t.backward(out, dout)
        results.append((out.data.copy(), p.grad.copy(), t.acts.high))
    (out, grad, high), (out_ref, grad_ref, high_ref) = results
    np.testing.assert_allclose(out, out_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-12, atol=1e-14)
    assert high_ref - high == 2 * 3 * 4 + (16 - 2 * 3 * 4 % 16) % 16   # the (N, H) GLU output is not kept


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("adapted", [False, True])
def test_glu_linear_backward_finite_differences(T, adapted):
    check_grads(fused_mlp("silu", adapted), glu_linear_arrays(T))


def test_glu_linear_rejects_bad_input():
    arrays = glu_linear_arrays(2)
    with pytest.raises(ValueError, match="needs 2 x 2"):
        run_op(lambda t, p: ops.glu_linear(t, p["x"], p["B"]), arrays)   # a (4, 2) weight reads H = 2
    with pytest.raises(ValueError, match="act must be"):
        run_op(lambda t, p: ops.glu_linear(t, p["x"], p["W"], "relu"), arrays)
    with pytest.raises(ValueError, match="outside the output"):
        run_op(lambda t, p: ops.glu_linear(t, p["x"], p["W"], "silu", (p["A"], p["B"], 0.6, np.array([[0, 3], [5, 1]]))),
               arrays)


# ----------------------------------------------------------------------------- rmsnorm_linear (normed input recomputed)

def rmsnorm_linear_arrays(T, seed=13):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, T, 4)), "nw": 1 + 0.1 * rng.standard_normal(4), "W": rng.standard_normal((5, 4)),
            "b": rng.standard_normal(5), "A": rng.standard_normal((4, 4)), "B": rng.standard_normal((4, 2))}


def fused_norm(adapted):
    return lambda t, p: ops.rmsnorm_linear(t, p["x"], p["nw"], 1e-5, p["W"], p["b"],
                                           (p["A"], p["B"], 0.6, GL_PARTS) if adapted else None)


def unfused_norm(adapted):
    def build(t, p):
        n = ops.rmsnorm(t, p["x"], p["nw"], 1e-5)
        out = ops.linear(t, n, p["W"], p["b"])
        return ops.lora_(t, out, n, p["A"], p["B"], 0.6, GL_PARTS) if adapted else out
    return build


@pytest.mark.parametrize("adapted", [False, True])
def test_rmsnorm_linear_equals_rmsnorm_then_linear(adapted):
    arrays = rmsnorm_linear_arrays(3)
    results = []
    for build in (fused_norm(adapted), unfused_norm(adapted)):
        t, p, out = run_op(build, arrays)
        p.zero_grad()
        t.backward(out, np.random.default_rng(2).standard_normal(out.shape))
        results.append((out.data.copy(), p.grad.copy(), t.acts.high))
    (out, grad, high), (out_ref, grad_ref, high_ref) = results
    np.testing.assert_allclose(out, out_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-12, atol=1e-14)
    assert high_ref - high == 2 * 3 * 4 + (16 - 2 * 3 * 4 % 16) % 16   # the (N, C) normed input is not kept


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("adapted", [False, True])
def test_rmsnorm_linear_backward_finite_differences(T, adapted):
    check_grads(fused_norm(adapted), rmsnorm_linear_arrays(T))


def test_rmsnorm_linear_rejects_bad_input():
    arrays = rmsnorm_linear_arrays(2)
    with pytest.raises(ValueError, match="features"):
        run_op(lambda t, p: ops.rmsnorm_linear(t, p["x"], p["nw"], 1e-5, p["B"]), arrays)
    with pytest.raises(ValueError, match="eps"):
        run_op(lambda t, p: ops.rmsnorm_linear(t, p["x"], p["nw"], 0.0, p["W"]), arrays)
    with pytest.raises(ValueError, match="bias"):
        run_op(lambda t, p: ops.rmsnorm_linear(t, p["x"], p["nw"], 1e-5, p["W"], p["nw"]), arrays)
