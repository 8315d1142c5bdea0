"""Optimizer helper kernels: per-segment norms, unscale + non-finite count, seeded noise."""
import numpy as np
import pytest

import nt
from nt.optim import block_table
from optim_reference import gauss_ref

k = nt.backend("cpu")


def tables(sizes, block):
    seg = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    blocks, owner, _ = block_table(seg, block=block)
    return seg, blocks, owner


def test_block_table_cuts_segments_without_straddling():
    seg, blocks, owner = tables([5, 0, 9, 1], 4)
    assert blocks.tolist() == [0, 4, 5, 9, 13, 14, 15]
    assert owner.tolist() == [0, 0, 2, 2, 2, 3]


def test_block_table_cuts_at_every_change_of_decay():
    seg = np.array([0, 10, 16], np.int64)
    mask = np.array([1] * 3 + [0] * 9 + [1] * 4, np.uint8)   # runs 0-3, 3-12 (over a segment edge), 12-16
    blocks, owner, decay = block_table(seg, mask, block=4)
    assert blocks.tolist() == [0, 3, 7, 10, 12, 16]
    assert owner.tolist() == [0, 0, 0, 1, 1]
    assert decay.tolist() == [1, 0, 0, 0, 1]
    for b in range(owner.size):  # each block's flag is the mask over all of it
        assert np.all(mask[blocks[b]:blocks[b + 1]] == decay[b])
    with pytest.raises(ValueError, match="decay mask"):
        block_table(seg, mask[:-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_update_decay_flags_match_a_per_element_mask(dtype):
    """The per-block decay flags give exactly the per-element rule (decay only where the
    mask is 1), zero_grads leaves the grads zero without changing the update, and a frozen
    tensor (scale 0) is untouched but for its grads."""
    rng = np.random.default_rng(3)
    seg = np.array([0, 5000, 5100, 20000], np.int64)
    mask = np.repeat(np.array([1, 0, 1], np.uint8), np.diff(seg))
    n = int(seg[-1])
    p, g, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    blocks, owner, decay = block_table(seg, mask, block=4096)
    scale, steps = np.array([1.0, 1.0, 0.0]), np.array([3, 3, 3], np.int64)
    lr, b1, b2, eps, l2, wd, gs = 1e-2, 0.9, 0.95, 1e-8, 0.01, 0.1, 0.5
    # the per-element reference (float64), tensor 2 frozen
    G = gs * g.astype(np.float64) + mask * l2 * p
    M = b1 * m + (1 - b1) * G
    V = b2 * v + (1 - b2) * G * G
    P = p - lr * ((M / (1 - b1 ** 3)) / (np.sqrt(V / (1 - b2 ** 3)) + eps) + mask * wd * p)
    live = slice(0, 5100)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    results = []
    for zero in (False, True):
        pp, gg, mm, vv = p.copy(), g.copy(), m.copy(), v.copy()
        k.adam_update(pp, gg, mm, vv, blocks, owner, decay, scale, steps, lr, b1, b2, eps, l2, wd,
                      np.array([gs]), zero)
        np.testing.assert_allclose(pp[live], P[live], **tol)
        np.testing.assert_allclose(mm[live], M[live], **tol)
        np.testing.assert_allclose(vv[live], V[live], **tol)
        assert np.array_equal(pp[5100:], p[5100:]) and np.array_equal(mm[5100:], m[5100:])
        assert np.array_equal(gg, np.zeros(n) if zero else g)
        results.append((pp, mm, vv))
    for a, b in zip(*results):  # zeroing the grads does not touch the update, bit for bit
        assert np.array_equal(a, b)


def test_clip_scale_is_clip_factors_rule():
    """clip_scale_ writes [factor, norm] by clip_factor's rule: max_norm / (norm + 1e-6)
    above the limit, 1 within it or for a non-finite norm."""
    from nt.optim import clip_factor
    x = np.random.default_rng(2).standard_normal(30000).astype(np.float32)
    partials = np.empty(k.sum_squares_blocks(x.size))
    out = np.zeros(2)
    norm = float(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    for max_norm, factor in [(1.0, 1.0 / (norm + 1e-6)), (1e6, 1.0), (0.0, 1.0)]:
        k.optim.clip_scale_(x, partials, max_norm, out)
        assert out[1] == pytest.approx(norm, rel=1e-12) and out[0] == pytest.approx(factor, rel=1e-12)
        params = nt.Params("cpu", np.float32, [("x", (x.size,), True)])
        params.grad[:] = x
        assert clip_factor(params, max_norm) == (out[1], out[0])  # the same numbers, bit for bit
    x[7] = np.inf
    k.optim.clip_scale_(x, partials, 1.0, out)
    assert out[0] == 1.0 and np.isinf(out[1])


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
