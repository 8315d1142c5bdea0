"""The CUDA flash-attention kernels against a plain NumPy reference (float64), under the
simulator at tiny sizes: causal, bidirectional, sliding window, GQA / MQA, a KV cache
(q0 > 0), the split-K decode path (one query row), T not a multiple of the tiles, and
head sizes that spread a row over several lanes; the GPU's shuffle branch too, with an
emulated shfl_xor_sync. Also: the backward is deterministic, its scratch is reused, and
an oversized head is refused. Simulated local arrays start as NaN (see the fixture).

tests/cuda/test_kernels.py checks the same kernels against the CPU twins in float64 too.
"""
import numpy as np
import pytest

import nt

gpu = nt.backend("cuda")
attention = pytest.importorskip("nt.kernels.cuda.attention")

TOL = dict(rtol=2e-4, atol=2e-5)  # float32 kernels against a float64 reference


@pytest.fixture(autouse=True)
def _nan_local_arrays(monkeypatch):
    """Simulated local arrays start as NaN, not np.empty's leftovers: a kernel that reads a
    register slice before writing it (x *= 0 to clear it, say) fails instead of passing by
    luck, as it would not on a GPU."""
    if attention.SIMULATOR:
        from numba.cuda.simulator.kernelapi import FakeCUDALocal
        empty = FakeCUDALocal.array
        monkeypatch.setattr(FakeCUDALocal, "array", lambda self, shape, dtype, alignment=None:
                            _nan_filled(empty(self, shape, dtype, alignment)))


def _nan_filled(a):
    if a.dtype.kind == "f":
        a.fill(np.nan)
    return a


def reference(qkv, dout, NH, NKV, window, q0, causal):
    """out, lse and d(qkv) of attention over the fused qkv rows, in float64."""
    B, T, width = qkv.shape
    hs = width // (NH + 2 * NKV)
    x = qkv.astype(np.float64)
    q = x[:, q0:, :NH * hs].reshape(B, T - q0, NH, hs)
    k = x[:, :, NH * hs:(NH + NKV) * hs].reshape(B, T, NKV, hs)
    v = x[:, :, (NH + NKV) * hs:].reshape(B, T, NKV, hs)
    t = np.arange(q0, T)[:, None]
    j = np.arange(T)[None, :]
    visible = (j <= t) if causal else np.ones((T - q0, T), bool)
    if window > 0:
        visible &= j > t - window
    out = np.zeros((B, T - q0, NH, hs))
    lse = np.zeros((B, NH, T - q0))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    do = dout.astype(np.float64).reshape(B, T - q0, NH, hs)
    for h in range(NH):
        g = h // (NH // NKV)
        s = np.einsum("bic,bjc->bij", q[:, :, h], k[:, :, g]) / np.sqrt(hs)
        s = np.where(visible, s, -np.inf)
        m = s.max(axis=2, keepdims=True)
        lse[:, h] = (m + np.log(np.exp(s - m).sum(axis=2, keepdims=True)))[..., 0]
        p = np.exp(s - lse[:, h, :, None])
        out[:, :, h] = p @ v[:, :, g]
        dp = np.einsum("bic,bjc->bij", do[:, :, h], v[:, :, g])
        ds = p * (dp - (do[:, :, h] * out[:, :, h]).sum(axis=2, keepdims=True)) / np.sqrt(hs)
        dq[:, :, h] = ds @ k[:, :, g]
        dk[:, :, g] += np.einsum("bij,bic->bjc", ds, q[:, :, h])
        dv[:, :, g] += np.einsum("bij,bic->bjc", p, do[:, :, h])
    dqkv = np.zeros_like(x)
    dqkv[:, q0:, :NH * hs] = dq.reshape(B, T - q0, -1)
    dqkv[:, :, NH * hs:(NH + NKV) * hs] = dk.reshape(B, T, -1)
    dqkv[:, :, (NH + NKV) * hs:] = dv.reshape(B, T, -1)
    return out.reshape(B, T - q0, NH * hs), lse, dqkv


def run(qkv, dout, NH, NKV, window, q0, causal, dqkv0):
    """The CUDA forward and backward on device copies; returns out, lse, dqkv (host)."""
    B, T, width = qkv.shape
    hs = width // (NH + 2 * NKV)
    out = gpu.to_device(np.full((B, T - q0, NH * hs), np.nan, np.float32))  # must be overwritten
    lse = gpu.to_device(np.full((B, NH, T - q0), np.nan, np.float32))
    d_qkv, d_dqkv = gpu.to_device(qkv), gpu.to_device(dqkv0)
    work = gpu.to_device(np.zeros(attention.attention_work_shape(T), np.float32))
    gpu.attention_forward(out, lse, d_qkv, work, NH, NKV, window, q0, causal)
    gpu.attention_backward(d_dqkv, gpu.to_device(dout), d_qkv, out, lse, work, NH, NKV, window, q0, causal)
    return gpu.to_host(out), gpu.to_host(lse), gpu.to_host(d_dqkv)


CASES = {  # NH, NKV, window, q0, T, causal, hs
    "causal-odd-T": (2, 2, 0, 0, 7, True, 3),
    "gqa-window": (4, 2, 3, 0, 9, True, 5),
    "mqa-bidirectional": (4, 1, 0, 0, 6, False, 4),
    "kv-cache-rows": (2, 1, 0, 5, 9, True, 8),
    "decode": (2, 1, 0, 10, 11, True, 6),           # split-K: 2 splits, rows without keys in the second
    "decode-window-gqa": (4, 2, 6, 12, 13, True, 3),
    "decode-bidirectional": (2, 2, 0, 8, 9, False, 3),
    "wide-head": (1, 1, 0, 0, 5, True, 24),         # a row over 8 lanes, 3 elements each; wider than a block
}


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_numpy(case):
    NH, NKV, window, q0, T, causal, hs = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    B = 2
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    dout = rng.standard_normal((B, T - q0, NH * hs)).astype(np.float32)
    dqkv0 = rng.standard_normal(qkv.shape).astype(np.float32)  # the backward accumulates
    out, lse, dqkv = run(qkv, dout, NH, NKV, window, q0, causal, dqkv0)
    want_out, want_lse, want_dqkv = reference(qkv, dout, NH, NKV, window, q0, causal)
    np.testing.assert_allclose(out, want_out, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)
    np.testing.assert_allclose(dqkv - dqkv0, want_dqkv, **TOL)


def _emulated_shfl_xor_sync(cuda, mask, value, lane_mask):
    """shfl_xor_sync for the simulator, which lacks it: every thread posts its value in
    shared memory and reads its partner's, between two block barriers. Correct for the
    attention kernels because every thread of the block calls their lane sums together."""
    posted = cuda.shared.array(128, np.float64)
    t = cuda.threadIdx.x
    posted[t] = value
    cuda.syncthreads()
    other = posted[t ^ lane_mask]
    cuda.syncthreads()
    return type(value)(other)


@pytest.mark.parametrize("case", ["gqa-window", "kv-cache-rows", "decode", "wide-head"])
def test_shuffle_path_matches_numpy(case, monkeypatch):
    """The GPU branch of the lane sums (a butterfly of register shuffles, which the
    simulator lacks) run in the simulator with an emulated shfl_xor_sync."""
    if not attention.SIMULATOR:
        pytest.skip("on a GPU every test runs the shuffle path")
    from numba.cuda.simulator.kernelapi import FakeCUDAModule
    assert attention.THREADS <= 128
    monkeypatch.setattr(FakeCUDAModule, "shfl_xor_sync", _emulated_shfl_xor_sync, raising=False)
    monkeypatch.setattr(attention, "SIMULATOR", False)
    test_attention_matches_numpy(case)


def test_backward_is_deterministic_and_reuses_its_scratch():
    """Two identical backward runs give bit-identical grads (one owner per grad row, no
    atomics), and the second takes no new scratch."""
    NH, NKV, window, q0, T, causal, hs = 4, 2, 0, 0, 5, True, 3  # two heads add into each k, v row
    rng = np.random.default_rng(7)
    qkv = rng.standard_normal((2, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    dout = rng.standard_normal((2, T - q0, NH * hs)).astype(np.float32)
    zero = np.zeros_like(qkv)
    first = run(qkv, dout, NH, NKV, window, q0, causal, zero)[2]
    scratch = attention._scratch[np.dtype(np.float32)]
    second = run(qkv, dout, NH, NKV, window, q0, causal, zero)[2]
    assert attention._scratch[np.dtype(np.float32)] is scratch
    np.testing.assert_array_equal(first, second)


def test_lanes_cover_every_head_size():
    """Each row fits its lanes' register slices, rows tile the block, and a row stays
    within one warp, for every head size the kernels accept."""
    limit = min(attention.HS_MAX, attention.NACC * attention.MAX_LANES)
    for hs in range(1, limit + 1):
        lanes = attention.lanes_for(hs)
        assert lanes * attention.NACC >= hs and attention.MIN_LANES <= lanes <= attention.MAX_LANES
        assert attention.THREADS % lanes == 0 and lanes & (lanes - 1) == 0


def test_oversized_head_is_refused():
    hs = min(attention.HS_MAX, attention.NACC * attention.MAX_LANES) + 1
    T, NH = 3, 1
    qkv = gpu.to_device(np.zeros((1, T, 3 * hs), np.float32))
    out = gpu.to_device(np.zeros((1, T, hs), np.float32))
    lse = gpu.to_device(np.zeros((1, NH, T), np.float32))
    with pytest.raises(ValueError, match="head sizes up to"):
        gpu.attention_forward(out, lse, qkv, None, NH, NH, 0, 0, True)


@pytest.mark.gpu
@pytest.mark.parametrize("hs", [64, 128, 256])
def test_gpu_sizes_match_numpy(hs):
    """On hardware (skipped under the simulator): the head sizes models use, at a T that
    is not a multiple of any tile, through the prefill and the split-K decode paths."""
    rng = np.random.default_rng(hs)
    B, NH, NKV, T = 2, 4, 2, 301
    for window, q0, causal in [(0, 0, True), (128, 0, True), (0, 0, False), (0, T - 1, True), (64, T - 1, True)]:
        qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
        dout = rng.standard_normal((B, T - q0, NH * hs)).astype(np.float32)
        dqkv0 = np.zeros_like(qkv)
        got = run(qkv, dout, NH, NKV, window, q0, causal, dqkv0)
        for g, w in zip(got, reference(qkv, dout, NH, NKV, window, q0, causal)):
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_random_configurations_match_numpy():
    """A sweep of random shapes and options (slow under the simulator: CI skips it)."""
    rng = np.random.default_rng(2026)
    limit = min(attention.HS_MAX, attention.NACC * attention.MAX_LANES)
    for _ in range(40):
        NKV = int(rng.integers(1, 3))
        NH = NKV * int(rng.integers(1, 3))
        T = int(rng.integers(1, 14))
        hs = int(rng.integers(1, limit + 1))
        causal = bool(rng.random() < 0.7)
        window = int(rng.integers(1, T + 2)) if causal and rng.random() < 0.5 else 0
        q0 = int(rng.integers(0, T)) if rng.random() < 0.5 else 0
        B = int(rng.integers(1, 3))
        qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
        dout = rng.standard_normal((B, T - q0, NH * hs)).astype(np.float32)
        dqkv0 = rng.standard_normal(qkv.shape).astype(np.float32)
        out, lse, dqkv = run(qkv, dout, NH, NKV, window, q0, causal, dqkv0)
        want = reference(qkv, dout, NH, NKV, window, q0, causal)
        msg = f"NH={NH} NKV={NKV} T={T} hs={hs} causal={causal} window={window} q0={q0} B={B}"
        np.testing.assert_allclose(out, want[0], **TOL, err_msg=msg)
        np.testing.assert_allclose(lse, want[1], **TOL, err_msg=msg)
        np.testing.assert_allclose(dqkv - dqkv0, want[2], **TOL, err_msg=msg)


GPU_LAYOUT = dict(THREADS=128, NACC=8, KT=8, MIN_LANES=4, MAX_LANES=32, DECODE_BLOCKS=264)


@pytest.mark.slow
@pytest.mark.parametrize("hs, case", [(64, "gqa-window"), (256, "kv-cache-rows"), (128, "decode")])
def test_gpu_layout_in_the_simulator(hs, case, monkeypatch):
    """The GPU's exact layout (128-thread blocks, 8-key tiles, 8-32 lanes per row, the
    shuffle branch with an emulated shfl_xor_sync) run in the simulator: its kernels read
    these module constants when they run, so patching them is enough. Slow: 128 Python
    threads per block."""
    if not attention.SIMULATOR:
        pytest.skip("on a GPU the layout runs for real (test_gpu_sizes_match_numpy)")
    from numba.cuda.simulator.kernelapi import FakeCUDAModule
    for name, value in GPU_LAYOUT.items():
        monkeypatch.setattr(attention, name, value)
    monkeypatch.setattr(attention, "MAX_ROWS", attention.THREADS // attention.MIN_LANES)
    monkeypatch.setattr(attention, "SHARE", attention.KT * (attention.THREADS + attention.MAX_ROWS))
    monkeypatch.setattr(attention, "ROW_SHARE", attention.THREADS + attention.MAX_ROWS)
    monkeypatch.setattr(FakeCUDAModule, "shfl_xor_sync", _emulated_shfl_xor_sync, raising=False)
    monkeypatch.setattr(attention, "SIMULATOR", False)
    NH, NKV, window, q0, T, causal, _ = CASES[case]
    rng = np.random.default_rng(hs)
    qkv = rng.standard_normal((1, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    dout = rng.standard_normal((1, T - q0, NH * hs)).astype(np.float32)
    got = run(qkv, dout, NH, NKV, window, q0, causal, np.zeros_like(qkv))
    for g, w in zip(got, reference(qkv, dout, NH, NKV, window, q0, causal)):
        np.testing.assert_allclose(g, w, **TOL)
