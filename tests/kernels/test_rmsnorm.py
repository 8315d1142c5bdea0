import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def rms_reference(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def qk_norm_reference(qkv, qw, kw, NH, NKV, eps):
    B, T, W = qkv.shape
    hs = qw.shape[0]
    out = qkv.copy()
    q = qkv[..., :NH * hs].reshape(B, T, NH, hs)
    k = qkv[..., NH * hs:(NH + NKV) * hs].reshape(B, T, NKV, hs)
    out[..., :NH * hs] = rms_reference(q, qw, eps).reshape(B, T, NH * hs)
    out[..., NH * hs:(NH + NKV) * hs] = rms_reference(k, kw, eps).reshape(B, T, NKV * hs)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 5])
def test_rmsnorm_forward_matches_numpy(dtype, T):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, T, 70)) * 3, rng.standard_normal(70)
    _, _, out = run_op(lambda t, p: ops.rmsnorm(t, p["x"], p["w"], 1e-5), {"x": x, "w": w}, dtype)
    np.testing.assert_allclose(out.data, rms_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rmsnorm_backward_finite_differences():
    rng = np.random.default_rng(1)
    arrays = {"x": rng.standard_normal((2, 3, 7)), "w": rng.standard_normal(7)}
    check_grads(lambda t, p: ops.rmsnorm(t, p["x"], p["w"], 1e-5), arrays)


def test_rmsnorm_rejects_bad_input():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones((2, 4)), "w": np.ones(3)})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="features"):
        ops.rmsnorm(t, p["x"], p["w"])
    with pytest.raises(ValueError, match="eps"):
        ops.rmsnorm(t, p["x"], p["x"][0], eps=0.0)
    with pytest.raises(TypeError, match="dtype"):
        ops.rmsnorm(Tape("cpu", np.float32), p["x"], p["x"][0])


@pytest.mark.parametrize("NH,NKV,T", [(4, 2, 3), (2, 2, 1)])
def test_qk_norm_forward_matches_numpy(NH, NKV, T):
    rng = np.random.default_rng(2)
    hs = 6
    arrays = {"qkv": rng.standard_normal((2, T, (NH + 2 * NKV) * hs)) * 2,
              "qw": rng.standard_normal(hs), "kw": rng.standard_normal(hs)}
    _, _, out = run_op(lambda t, p: ops.qk_norm(t, p["qkv"], p["qw"], p["kw"], NH, NKV, 1e-6), arrays)
    np.testing.assert_allclose(out.data, qk_norm_reference(arrays["qkv"], arrays["qw"], arrays["kw"], NH, NKV, 1e-6),
                               rtol=1e-12, atol=1e-12)


def test_qk_norm_backward_finite_differences():
    rng = np.random.default_rng(3)
    NH, NKV, hs = 4, 2, 4
    arrays = {"qkv": rng.standard_normal((2, 3, (NH + 2 * NKV) * hs)),
              "qw": rng.standard_normal(hs), "kw": rng.standard_normal(hs)}
    check_grads(lambda t, p: ops.qk_norm(t, p["qkv"], p["qw"], p["kw"], NH, NKV, 1e-6), arrays)


def test_qk_norm_rejects_bad_input():
    _, p, _ = run_op(lambda t, p: p["qkv"], {"qkv": np.ones((1, 2, 24)), "w4": np.ones(4), "w3": np.ones(3)})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="head size"):
        ops.qk_norm(t, p["qkv"], p["w3"], p["w3"], 2, 2)  # hs = 24 / 6 = 4
    with pytest.raises(ValueError, match="divide"):
        ops.qk_norm(t, p["qkv"], p["w4"], p["w4"], 3, 2)
    with pytest.raises(ValueError, match="width"):
        ops.qk_norm(t, p["qkv"], p["w4"], p["w4"], 5, 5)


@pytest.mark.parametrize("frozen", [False, True])
def test_rmsnorm_backward_over_several_row_chunks(frozen):
    """rmsnorm_backward sums the weight grad per ROW_CHUNK rows into the scratch, then over
    the chunks: 37 rows (three chunks, the last one short) against the closed form in
    float64, with grads accumulated onto what they held; an empty dweight (frozen) leaves
    the input grad unchanged."""
    from nt.kernels.cpu import rmsnorm_backward, rmsnorm_forward
    from nt.kernels.cpu.rmsnorm import ROW_CHUNK
    rng = np.random.default_rng(4)
    N, C = 2 * ROW_CHUNK + 5, 9
    x, w, dy = rng.standard_normal((N, C)), rng.standard_normal(C), rng.standard_normal((N, C))
    out, rstd = np.empty((N, C)), np.empty(N)
    rmsnorm_forward(out, rstd, x, w, 1e-5)
    np.testing.assert_allclose(out, rms_reference(x, w, 1e-5), rtol=1e-12)
    dx0, dw0 = rng.standard_normal((N, C)), rng.standard_normal(C)
    dx, dw = dx0.copy(), (np.empty(0) if frozen else dw0.copy())
    rmsnorm_backward(dx, dw, dy, x, w, rstd, rng.standard_normal((N, C)))   # scratch: any contents
    xhat = x * rstd[:, None]
    g = dy * w
    want_dx = dx0 + rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
    if not frozen:
        np.testing.assert_allclose(dw, dw0 + (dy * xhat).sum(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scratch"):
        rmsnorm_backward(dx, dw, dy, x, w, rstd, np.empty((N - 1, C)))
