import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def reference(qkv, NH, NKV, window=0, causal=True):
    """Plain causal (or, causal=False, bidirectional) attention with K/V heads repeated
    for grouped queries."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    q = qkv[..., :NH * hs].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    k = qkv[..., NH * hs:(NH + NKV) * hs].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
    v = qkv[..., (NH + NKV) * hs:].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
    k, v = np.repeat(k, NH // NKV, axis=1), np.repeat(v, NH // NKV, axis=1)
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    i, j = np.indices((T, T))
    allowed = ((j <= i) | (not causal)) & ((j > i - window) if window > 0 else True)
    att = np.where(allowed, att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    return (att @ v).transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


CASES = [(4, 4, 0), (4, 2, 0), (4, 1, 0), (2, 2, 3)]  # MHA, GQA, MQA, sliding window


@pytest.mark.parametrize("NH,NKV,window", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_forward_matches_numpy(NH, NKV, window, dtype):
    hs, B, T = 8, 2, 7
    qkv = np.random.default_rng(0).standard_normal((B, T, (NH + 2 * NKV) * hs)) * 2
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window), {"qkv": qkv}, dtype)
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, window),
                               rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("NH,NKV,window", CASES)
def test_attention_backward_finite_differences(NH, NKV, window):
    hs, B, T = 3, 2, 5
    qkv = np.random.default_rng(1).standard_normal((B, T, (NH + 2 * NKV) * hs))
    check_grads(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window), {"qkv": qkv})


@pytest.mark.parametrize("NH,NKV,window", [(2, 2, 0), (4, 2, 40), (2, 1, 64)])
def test_attention_many_blocks_matches_numpy(NH, NKV, window):
    """Past one block of query rows (QBLOCK): later blocks see every earlier key, and a
    window reaches back across block boundaries."""
    hs, B, T = 4, 2, 150
    qkv = np.random.default_rng(5).standard_normal((B, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window), {"qkv": qkv})
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, window), rtol=1e-12, atol=1e-12)
    _, _, tail = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window, 100), {"qkv": qkv})
    np.testing.assert_allclose(tail.data, reference(qkv, NH, NKV, window)[:, 100:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [0, 30])
def test_attention_many_blocks_backward_finite_differences(window):
    hs, B, T, NH, NKV = 2, 1, 70, 2, 1
    qkv = np.random.default_rng(6).standard_normal((B, T, (NH + 2 * NKV) * hs))
    check_grads(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window), {"qkv": qkv}, max_checks=120)


def test_attention_rejects_bad_heads():
    _, p, _ = run_op(lambda t, p: p["qkv"], {"qkv": np.ones((1, 2, 18))})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="divide"):
        ops.attention(t, p["qkv"], 4, 3)
    with pytest.raises(ValueError, match="width"):
        ops.attention(t, p["qkv"], 4, 4)


@pytest.mark.parametrize("NH,NKV,window", CASES)
@pytest.mark.parametrize("q0", [4, 6])
def test_attention_with_kv_cache_rows_matches_last_rows(NH, NKV, window, q0):
    """q0 > 0: rows before q0 only supply keys and values; the T - q0 query rows get the
    same output as in full causal attention (the KV-cache case; q0 = T-1 is one token)."""
    hs, B, T = 4, 2, 7
    qkv = np.random.default_rng(2).standard_normal((B, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window, q0), {"qkv": qkv})
    assert out.shape == (B, T - q0, NH * hs)
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, window)[:, q0:], rtol=1e-12, atol=1e-12)


def test_attention_with_kv_cache_rows_backward():
    hs, B, T, NH, NKV = 3, 2, 5, 4, 2
    qkv = np.random.default_rng(3).standard_normal((B, T, (NH + 2 * NKV) * hs))
    check_grads(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, 0, 3), {"qkv": qkv})


def test_attention_single_position():
    qkv = np.random.default_rng(4).standard_normal((2, 1, 4 * 4))
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], 2, 1), {"qkv": qkv})
    np.testing.assert_allclose(out.data, reference(qkv, 2, 1), rtol=1e-12)  # = its own value
    check_grads(lambda t, p: ops.attention(t, p["qkv"], 2, 1), {"qkv": qkv})


def test_attention_rejects_bad_q0():
    _, p, _ = run_op(lambda t, p: p["qkv"], {"qkv": np.ones((1, 3, 12))})
    with pytest.raises(ValueError, match="q0"):
        ops.attention(Tape("cpu", np.float64), p["qkv"], 2, 1, q0=3)


def test_attention_gives_blas_its_threads_back():
    """The kernels hold OpenBLAS to one thread while they run (their BLAS calls come from
    inside a parallel loop); the matmuls after them must get every thread back."""
    from numba import njit

    from nt.kernels.cpu.blas import blas_get_threads, blas_set_threads

    threads = njit(lambda: blas_get_threads())
    set_threads = njit(lambda n: blas_set_threads(n))
    before = threads()
    set_threads(2)
    try:
        if threads() != 2:
            pytest.skip("SciPy's BLAS is not OpenBLAS: its threads are not nt's to set")
        tape, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], 2, 2), {"qkv": np.ones((2, 70, 24))})
        assert threads() == 2
        tape.backward(out)
        assert threads() == 2
    finally:
        set_threads(before)


# ----------------------------------------------------------------------------- bidirectional

@pytest.mark.parametrize("NH,NKV", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncausal_attention_forward_matches_numpy(NH, NKV, dtype):
    hs, B, T = 8, 2, 7
    qkv = np.random.default_rng(7).standard_normal((B, T, (NH + 2 * NKV) * hs)) * 2
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, causal=False), {"qkv": qkv}, dtype)
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, causal=False),
                               rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("NH,NKV", [(2, 2), (4, 2), (2, 1)])
def test_noncausal_attention_backward_finite_differences(NH, NKV):
    hs, B, T = 3, 2, 5
    qkv = np.random.default_rng(8).standard_normal((B, T, (NH + 2 * NKV) * hs))
    check_grads(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, causal=False), {"qkv": qkv})


def test_noncausal_attention_many_blocks():
    """Past one block of query rows: every block sees the keys after it too."""
    hs, B, T, NH, NKV = 4, 2, 150, 4, 2
    qkv = np.random.default_rng(9).standard_normal((B, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, causal=False), {"qkv": qkv})
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, causal=False), rtol=1e-12, atol=1e-12)
    # two query heads sharing one kv head, two blocks of rows, checked by differences
    small = np.concatenate([qkv[:1, :70, :2 * hs], qkv[:1, :70, NH * hs:NH * hs + hs],
                            qkv[:1, :70, (NH + NKV) * hs:(NH + NKV) * hs + hs]], axis=2)
    check_grads(lambda t, p: ops.attention(t, p["qkv"], 2, 1, causal=False), {"qkv": small}, max_checks=120)


def test_noncausal_attention_kv_cache_rows_and_single_position():
    """q0 > 0 with causal=False: the last T - q0 rows of full bidirectional attention;
    T = 1: each output is its own value."""
    hs, B, T, NH, NKV = 3, 2, 6, 2, 1
    qkv = np.random.default_rng(10).standard_normal((B, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, 0, 4, causal=False), {"qkv": qkv})
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, causal=False)[:, 4:], rtol=1e-12, atol=1e-12)
    check_grads(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, 0, 4, causal=False), {"qkv": qkv})
    one = qkv[:, :1]
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, causal=False), {"qkv": one})
    np.testing.assert_allclose(out.data, np.tile(one[..., (NH + NKV) * hs:], (1, 1, NH // NKV)), rtol=1e-12)


def test_noncausal_attention_refuses_a_window_and_non_bool():
    _, p, _ = run_op(lambda t, p: p["qkv"], {"qkv": np.ones((1, 3, 12))})
    with pytest.raises(ValueError, match="window"):
        ops.attention(Tape("cpu", np.float64), p["qkv"], 2, 1, window=2, causal=False)
    with pytest.raises(TypeError, match="causal"):
        ops.attention(Tape("cpu", np.float64), p["qkv"], 2, 1, causal="no")


# ----------------------------------------------------------------------------- grouped blocks
# Query heads that share a kv head are stacked into one block (their rows gathered into
# the worker's scratch); these cases reach it with 3 and 4 heads a group, two blocks of
# positions (T not a multiple of the block), a KV cache, a window and no causal mask.

GROUPED = [(6, 2, 0, 0, True), (8, 2, 0, 0, True), (6, 2, 20, 0, True), (8, 2, 0, 5, True),
           (6, 2, 20, 5, True), (8, 2, 0, 5, False)]


@pytest.mark.parametrize("NH,NKV,window,q0,causal", GROUPED)
def test_grouped_attention_matches_numpy(NH, NKV, window, q0, causal):
    hs, B, T = 4, 2, 70
    qkv = np.random.default_rng(11).standard_normal((B, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window, q0, causal), {"qkv": qkv})
    np.testing.assert_allclose(out.data, reference(qkv, NH, NKV, window, causal)[:, q0:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("NH,NKV,window,q0,causal", [(3, 1, 0, 0, True), (4, 1, 30, 3, True), (3, 1, 0, 3, False)])
def test_grouped_attention_backward_finite_differences(NH, NKV, window, q0, causal):
    hs, B, T = 2, 1, 67
    qkv = np.random.default_rng(12).standard_normal((B, T, (NH + 2 * NKV) * hs))
    check_grads(lambda t, p: ops.attention(t, p["qkv"], NH, NKV, window, q0, causal), {"qkv": qkv}, max_checks=120)


@pytest.mark.parametrize("rows", [128, 40])
def test_grouped_attention_in_less_scratch(rows):
    """Scratch for fewer rows than a group's block: 128 rows hold two of three heads a block
    (a second block of one head follows), 40 rows one head at 40 positions; the results
    are those of the full scratch."""
    from nt.kernels import cpu

    hs, B, T, NH, NKV = 4, 2, 70, 6, 2
    rng = np.random.default_rng(13)
    qkv, dout = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)), rng.standard_normal((B, T, NH * hs))
    results = []
    for work in (np.zeros(cpu.attention_work_shape(T)), np.zeros((2, rows * (2 * T + 2 * hs + 1)))):
        out, lse, dqkv = np.zeros((B, T, NH * hs)), np.zeros((B, NH, T)), np.zeros_like(qkv)
        cpu.attention_forward(out, lse, qkv, work, NH, NKV, 0, 0, True)
        cpu.attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, 0, 0, True)
        results.append((out, dqkv))
    np.testing.assert_allclose(results[0][0], reference(qkv, NH, NKV), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)


def test_attention_refuses_too_little_scratch():
    from nt.kernels import cpu

    qkv = np.zeros((1, 4, 24))
    with pytest.raises(ValueError, match="work"):
        cpu.attention_forward(np.zeros((1, 4, 8)), np.zeros((1, 2, 4)), qkv, np.zeros((2, 10)), 2, 2, 0, 0, True)


def reference_backward(qkv, dout, NH, NKV, window=0, q0=0, causal=True):
    """dqkv of reference() restricted to query rows q0.. for the output grad dout, by the
    softmax-grad formulas: dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, dV = P^T dO."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    scale, dqkv = 1 / np.sqrt(hs), np.zeros_like(qkv)
    i, j = np.indices((T, T))
    allowed = ((j <= i) | (not causal)) & ((j > i - window) if window > 0 else True)
    for b in range(B):
        for h in range(NH):
            kc, vc = (NH + h // (NH // NKV)) * hs, (NH + NKV + h // (NH // NKV)) * hs
            q, k, v = qkv[b, :, h * hs:(h + 1) * hs], qkv[b, :, kc:kc + hs], qkv[b, :, vc:vc + hs]
            s = np.where(allowed, q @ k.T * scale, -np.inf)[q0:]
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            do = dout[b, :, h * hs:(h + 1) * hs]
            ds = p * (do @ v.T - (do * (p @ v)).sum(-1, keepdims=True)) * scale
            dqkv[b, q0:, h * hs:(h + 1) * hs] += ds @ k
            dqkv[b, :, kc:kc + hs] += ds.T @ q[q0:]
            dqkv[b, :, vc:vc + hs] += p.T @ do
    return dqkv


@pytest.mark.parametrize("NH,NKV,window,q0,causal", [(4, 4, 0, 0, True), (6, 2, 40, 0, True), (3, 1, 0, 70, True),
                                                    (6, 2, 30, 5, True), (6, 2, 0, 5, False)])
def test_attention_backward_matches_numpy(NH, NKV, window, q0, causal):
    """The backward over several blocks (keys x queries transposed inside the kernel) against
    the formulas in NumPy: every entry, where the finite-difference tests sample some."""
    from nt.kernels import cpu

    hs, B, T = 4, 2, 150
    rng = np.random.default_rng(14)
    qkv, dout = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)), rng.standard_normal((B, T - q0, NH * hs))
    out, lse, dqkv = np.zeros((B, T - q0, NH * hs)), np.zeros((B, NH, T - q0)), np.zeros_like(qkv)
    work = np.zeros(cpu.attention_work_shape(T))
    cpu.attention_forward(out, lse, qkv, work, NH, NKV, window, q0, causal)
    cpu.attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, window, q0, causal)
    np.testing.assert_allclose(dqkv, reference_backward(qkv, dout, NH, NKV, window, q0, causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("NH,NKV", [(2, 2), (3, 1)])
def test_attention_score_far_above_the_first(NH, NKV):
    """Scores spread over ~110 within a row, in a first and a second block (float32: a
    softmax shifted by anything but the row's max would overflow exp)."""
    from nt.kernels import cpu

    hs, B, T = 8, 1, 70
    rng = np.random.default_rng(15)
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs))
    qkv[0, :, :NH * hs] = 10.0                        # every query along (1, ..., 1)
    qkv[0, 0, NH * hs:(NH + NKV) * hs] = -1.0         # key 0: score -28 for every query
    qkv[0, 66, NH * hs:(NH + NKV) * hs] = 3.0         # key 66: score +85 (a second block)
    qkv[0, 2, NH * hs:(NH + NKV) * hs] = 3.0          # key 2: the same in the first block
    dout = rng.standard_normal((B, T, NH * hs))
    q32, d32 = qkv.astype(np.float32), dout.astype(np.float32)
    out, lse, dqkv = np.zeros((B, T, NH * hs), np.float32), np.zeros((B, NH, T), np.float32), np.zeros_like(q32)
    work = np.zeros(cpu.attention_work_shape(T), np.float32)
    cpu.attention_forward(out, lse, q32, work, NH, NKV, 0, 0, True)
    np.testing.assert_allclose(out, reference(qkv, NH, NKV), rtol=1e-4, atol=1e-4)
    cpu.attention_backward(dqkv, d32, q32, out, lse, work, NH, NKV, 0, 0, True)
    np.testing.assert_allclose(dqkv, reference_backward(qkv, dout, NH, NKV), rtol=1e-3, atol=1e-3)
