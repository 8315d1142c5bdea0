import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def _linear(bias: bool):
    def build(t, p):
        return ops.linear(t, p["x"], p["w"], p["b"] if bias else None)
    return build


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(3, 5), (1, 1), (2, 2)])  # up to GEMV_ROWS rows: a gemv per row
def test_linear_forward_matches_numpy(dtype, bias, rows):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((*rows, 7)), rng.standard_normal((11, 7)), rng.standard_normal(11)
    _, _, out = run_op(_linear(bias), {"x": x, "w": w, "b": b}, dtype)
    ref = x @ w.T + (b if bias else 0)
    np.testing.assert_allclose(out.data, ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_finite_differences(bias):
    rng = np.random.default_rng(1)
    check_grads(_linear(bias), {"x": rng.standard_normal((2, 3, 4)), "w": rng.standard_normal((5, 4)),
                                "b": rng.standard_normal(5)})


def test_linear_backward_accumulates():
    rng = np.random.default_rng(2)
    t, p, out = run_op(_linear(True), {"x": rng.standard_normal((4, 3)), "w": rng.standard_normal((2, 3)),
                                       "b": rng.standard_normal(2)})
    dout = rng.standard_normal(out.shape)
    p.zero_grad()
    t.backward(out, dout)
    once = p.grad.copy()
    t.backward(out, dout)
    np.testing.assert_allclose(p.grad, 2 * once)


def test_linear_rejects_bad_input():
    rng = np.random.default_rng(3)
    _, p, _ = run_op(lambda t, p: p["x"], {"x": rng.standard_normal((4, 3)), "w": rng.standard_normal((2, 5)),
                                           "b": rng.standard_normal(3)})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="features"):
        ops.linear(t, p["x"], p["w"])
    with pytest.raises(TypeError, match="nt Tensor"):
        ops.linear(t, np.zeros((4, 3)), p["w"])
    t32 = Tape("cpu", np.float32)
    with pytest.raises(TypeError, match="dtype"):
        ops.linear(t32, p["x"], p["w"])


@pytest.mark.parametrize("T", [1, 4])
def test_linear_transposed_forward_and_backward(T):
    """transposed=True multiplies by the (C, OC) weight itself: x @ W, as a tied
    embedding used the other way round."""
    rng = np.random.default_rng(3)
    arrays = {"x": rng.standard_normal((2, T, 5)), "w": rng.standard_normal((5, 3)), "b": rng.standard_normal(3)}

    def build(t, p):
        return ops.linear(t, p["x"], p["w"], p["b"], transposed=True)
    _, _, out = run_op(build, arrays)
    np.testing.assert_allclose(out.data, arrays["x"] @ arrays["w"] + arrays["b"], rtol=1e-12)
    check_grads(build, arrays)


def test_linear_transposed_rejects_mismatch():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones((2, 5)), "w": np.ones((3, 5))})
    with pytest.raises(ValueError, match="transposed"):
        ops.linear(Tape("cpu", np.float64), p["x"], p["w"], transposed=True)



@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("N, C, OC", [(37, 9, 70), (20, 70, 37), (70, 9, 20)])
def test_matmul_slabs_match_numpy(N, C, OC, transposed):
    """The kernels cut each product into one slab per thread along its longer side: these
    shapes cut every product (forward, input grad, weight grad) along columns in one case
    and rows in another, the last slab narrower than the others, and accumulate."""
    from nt.kernels.cpu import matmul_backward, matmul_forward
    rng = np.random.default_rng(4)
    x, dout, bias = rng.standard_normal((N, C)), rng.standard_normal((N, OC)), rng.standard_normal(OC)
    w = rng.standard_normal((C, OC) if transposed else (OC, C))
    wm = w if transposed else w.T  # x @ wm is the product
    out = np.empty((N, OC))
    matmul_forward(out, x, w, bias, transposed)
    np.testing.assert_allclose(out, x @ wm + bias, rtol=1e-12, atol=1e-12)
    dx0, dw0, db0 = (rng.standard_normal(a.shape) for a in (x, w, bias))
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    matmul_backward(dx, dw, db, dout, x, w, transposed)
    np.testing.assert_allclose(dx, dx0 + dout @ wm.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw0 + (x.T @ dout if transposed else dout.T @ x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, db0 + dout.sum(0), rtol=1e-12, atol=1e-12)
