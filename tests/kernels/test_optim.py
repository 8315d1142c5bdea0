"""Optimizer helper kernels: per-segment norms, unscale + non-finite count, seeded noise."""
import numpy as np
import pytest

import nt
from nt.optim import block_table
from optim_reference import gauss_ref

k = nt.backend("cpu")


def tables(sizes, block):
    seg = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return (seg, *block_table(seg, block))


def test_block_table_cuts_segments_without_straddling():
    seg, blocks, owner = tables([5, 0, 9, 1], 4)
    assert blocks.tolist() == [0, 4, 5, 9, 13, 14, 15]
    assert owner.tolist() == [0, 0, 2, 2, 2, 3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_sum_squares_matches_numpy(dtype):
    sizes = [7, 0, 10000, 1, 4096, 300]
    seg, blocks, owner = tables(sizes, 4096)
    x = np.random.default_rng(0).standard_normal(seg[-1]).astype(dtype)
    out = np.full(len(sizes), -1.0)
    partial = np.empty(owner.size)
    k.segment_sum_squares(x, blocks, owner, partial, out)
    want = [np.sum(x[seg[s]:seg[s + 1]].astype(np.float64) ** 2) for s in range(len(sizes))]
    np.testing.assert_allclose(out, want, rtol=1e-12)
    assert out[1] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unscale_check_scales_and_counts_nonfinite(dtype):
    x = np.random.default_rng(1).standard_normal(10000).astype(dtype)
    partials = np.empty(k.sum_squares_blocks(x.size))
    want = x * dtype(0.25)
    assert k.unscale_check_(x, 0.25, partials) == 0
    np.testing.assert_array_equal(x, want)
    x[[3, 5000, 9999]] = [np.inf, np.nan, -np.inf]
    assert k.unscale_check_(x, 1.0, partials) == 3
    assert k.unscale_check_(np.zeros(0, dtype), 0.5, partials) == 0


def test_unscale_check_counts_float32_overflow():
    # finite before scaling, infinite after: the stored float32 value is what counts
    x = np.array([3e38, 1.0], dtype=np.float32)
    assert k.unscale_check_(x, 4.0, np.empty(1)) == 1


def test_noise_matches_reference_hash():
    seg, blocks, owner = tables([5, 4, 3], 2)
    sigma = np.array([0.5, 0.0, 2.0])
    x = np.arange(12, dtype=np.float64)
    k.add_noise_(x, blocks, owner, sigma, 7, 3)
    z = gauss_ref(7, 3, 12)
    want = np.arange(12, dtype=np.float64) + np.repeat(sigma, np.diff(seg)) * z
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-13)
    assert np.array_equal(x[5:9], np.arange(5, 9))  # sigma 0: untouched


def test_noise_is_standard_normal_and_seeded():
    n = 200_000
    _, blocks, owner = tables([n], 4096)
    one = np.ones(1)
    a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
    k.add_noise_(a, blocks, owner, one, 1, 0)
    k.add_noise_(b, blocks, owner, one, 1, 0)
    k.add_noise_(c, blocks, owner, one, 1, 1)
    assert np.array_equal(a, b)
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1.0) < 0.01
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.01  # another event: independent numbers
    assert abs(np.mean(a ** 4) - 3.0) < 0.05   # Gaussian kurtosis
