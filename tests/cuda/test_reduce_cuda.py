"""Two-stage column reductions (kernels/cuda/reduce.py) behind every weight and bias grad.

Shapes are chosen so that the row chunks do not divide N (odd row counts), the columns
span several column tiles, and (chunks x tiles) tasks outnumber the simulator's grid, so
every stage-1 kernel grid-strides. Results must equal float64 NumPy sums and be bitwise
identical from run to run (no atomics: a fixed summation order).
"""
import numpy as np
import pytest

from nt.kernels.cuda import launch, reduce
from test_kernels import DTYPES, TOL, cpu, gpu, parity, randn


def test_chunks_cover_the_rows_once():
    for N in (1, 2, launch.CHUNK_ROWS, launch.CHUNK_ROWS + 1, 37, 10 ** 6):
        n_chunks, rows = reduce.chunks(N)
        assert 1 <= n_chunks <= launch.MAX_CHUNKS
        assert (n_chunks - 1) * rows < N <= n_chunks * rows  # no empty chunk, none missing


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_sums_odd_rows_many_columns(dtype):
    rng = np.random.default_rng(0)
    N, C = 37, 45  # 10 chunks of 4 rows (the last short), 6 column tiles of 8: 60 tasks on 4 blocks
    x = randn(rng, dtype, N, C)
    out0 = randn(rng, dtype, C)
    results = []
    for _ in range(2):
        out = gpu.to_device(out0)
        reduce.sum_columns_into(out, gpu.to_device(x))
        results.append(gpu.to_host(out))
    np.testing.assert_allclose(results[0], out0 + x.astype(np.float64).sum(axis=0), **TOL[dtype])
    assert np.array_equal(results[0], results[1])  # deterministic


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grads_odd_rows_many_columns(dtype):
    """matmul's bias, layernorm's and rmsnorm's weight grads (and QK-norm's) at shapes where
    the two stages grid-stride, against the CPU kernels."""
    rng = np.random.default_rng(1)
    N, C, OC = 37, 9, 45
    inp, weight = randn(rng, dtype, N, C), randn(rng, dtype, OC, C)
    parity("matmul_backward", [randn(rng, dtype, N, C), randn(rng, dtype, OC, C), randn(rng, dtype, OC),
                               randn(rng, dtype, N, OC), inp, weight, False], [0, 1, 2], dtype)
    x, w = randn(rng, dtype, N, OC), randn(rng, dtype, OC)
    mean, rstd = np.empty(N, dtype), np.empty(N, dtype)
    cpu.layernorm_forward(randn(rng, dtype, N, OC), mean, rstd, x, w, w, 1e-5)
    parity("layernorm_backward", [randn(rng, dtype, N, OC), randn(rng, dtype, OC), randn(rng, dtype, OC),
                                  randn(rng, dtype, N, OC), x, w, mean, rstd], [0, 1, 2], dtype)
    cpu.rmsnorm_forward(randn(rng, dtype, N, OC), rstd, x, w, 1e-6)
    parity("rmsnorm_backward", [randn(rng, dtype, N, OC), randn(rng, dtype, OC), randn(rng, dtype, N, OC), x, w,
                                rstd, randn(rng, dtype, N, OC)], [0, 1], dtype)   # the last: scratch
    B, T, NH, NKV, hs = 3, 7, 4, 2, 12  # B*T = 21 positions: 6 chunks; 2*hs = 24 columns: 3 tiles
    W = (NH + 2 * NKV) * hs
    qkv, qw, kw = randn(rng, dtype, B, T, W), randn(rng, dtype, hs), randn(rng, dtype, hs)
    rs = np.empty((B, T, NH + NKV), dtype)
    cpu.qk_norm_forward(randn(rng, dtype, B, T, W), rs, qkv, qw, kw, NH, NKV, 1e-6)
    for dq, dk in ((randn(rng, dtype, hs), randn(rng, dtype, hs)), (np.empty(0, dtype), randn(rng, dtype, hs))):
        parity("qk_norm_backward", [randn(rng, dtype, B, T, W), dq, dk, randn(rng, dtype, B, T, W), qkv, qw, kw, rs,
                                    NH, NKV], [0, 1, 2], dtype)


def test_learned_scale_grad_many_blocks():
    """ds = sum(x * dout) over more elements than one simulated grid covers."""
    rng = np.random.default_rng(2)
    n = 301
    parity("scale_backward", [randn(rng, np.float64, n), randn(rng, np.float64, 1), randn(rng, np.float64, n),
                              randn(rng, np.float64, n), np.array([0.7])], [0, 1], np.float64)


def test_segment_sums_more_segments_than_the_grid():
    """Per-tensor sums of squares (Chuck's norms): a block per segment finds its table
    blocks by binary search; more segments than simulated blocks, one without blocks."""
    rng = np.random.default_rng(3)
    bo = np.array([0, 10, 25, 31, 40, 52, 60, 61, 75], np.int64)
    bs = np.array([0, 0, 1, 3, 3, 4, 5, 5], np.int64)  # segment 2 has no block (an empty tensor)
    parity("segment_sum_squares", [randn(rng, np.float64, 75), bo, bs, np.zeros(8), np.zeros(6)], [4], np.float64)
