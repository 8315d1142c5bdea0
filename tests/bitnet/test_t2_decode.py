"""The ternary row dot (T2 rows . int8 activations) and BitNet models in the fused decoder."""
import numpy as np
import pytest
from numba import njit

from nt import bitnet
from nt.kernels.cpu import bitnet as kb


@njit(cache=True)
def _isum_generic(w, a, K, n):
    return kb._t2_isum_generic(w, a, K, n)


@njit(cache=True)
def _isum(w, a, K, n):
    return kb._t2_isum(w, a, K, n)


def packed_case(rng, OC, C):
    """Random ternary rows with extreme rows (all +1, all -1, all 0) and int8 activation rows
    with the code extremes -128 and 127 in every plane."""
    codes = rng.integers(-1, 2, (OC, C)).astype(np.int8)
    codes[0], codes[1], codes[2] = 1, -1, 0
    scales = rng.uniform(0.01, 0.05, OC).astype(np.float16).astype(np.float32)
    a = rng.integers(-128, 128, (3, C)).astype(np.int8)
    a[0], a[1] = -128, 127
    return codes, scales, bitnet.pack_ternary(codes, scales), a


@pytest.mark.parametrize("C", [768, 144, 32, 4])   # 6 vector steps; 1 step + a 4-byte tail; tails only
def test_t2_row_dot_is_the_exact_integer_dot(C):
    rng = np.random.default_rng(C)
    codes, scales, w, a = packed_case(rng, 7, C)
    ad = rng.uniform(1e-3, 1.0, 3).astype(np.float32)
    asum = a.astype(np.int64).sum(axis=1).astype(np.int32)
    out = np.empty((3, 7), np.float32)
    kb.matmul_t2(out, a, ad, asum, w)
    isum = a.astype(np.int64) @ codes.T.astype(np.int64)   # the definition, in 64-bit integers
    np.testing.assert_array_equal(out, scales[None, :] * isum.astype(np.float32) * ad[:, None])
    # the vector loops (x86 intrinsics on AVX2 hosts, generic IR elsewhere) give the same integers
    K = C // 4
    n = K // kb.T2_CHUNK
    for o in range(7):
        for r in range(3):
            want = int((a[r].astype(np.int64).reshape(4, K)[:, :n * 32]
                        * (codes[o].astype(np.int64).reshape(4, K)[:, :n * 32] + 1)).sum())
            assert _isum_generic(w[o], a[r], K, n) == want == _isum(w[o], a[r], K, n)


def test_t2_activation_quantiser_is_bitnets_absmax_rule():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 256)).astype(np.float32) * np.array([1, 1e-3, 0, 40], np.float32)[:, None]
    q, xd, xs = np.empty(256, np.int8), np.empty(1, np.float32), np.empty(1, np.int32)
    for row in x:
        kb.quantize_row_t2(q, xd, xs, row)
        a = max(np.abs(row).max(), np.float32(1e-5))
        np.testing.assert_array_equal(q, np.clip(np.rint(row * (np.float32(127) / a)), -128, 127).astype(np.int8))
        assert xd[0] == a / np.float32(127) and xs[0] == q.astype(np.int64).sum()
