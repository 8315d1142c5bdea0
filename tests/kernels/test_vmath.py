"""vmath's float32 exp against float64 libm over the whole float32 range, as a kernel
compiles it (fastmath=CONTRACT, vectorized), and the sigmoid / GELU rules built on it."""
import numpy as np
from numba import njit

from nt.kernels.cpu import vmath
from nt.kernels.cpu.activations import GELU_TANH, SIGMOID, SILU, _act_dact


@njit(cache=True, fastmath=vmath.CONTRACT)
def _exp_all(out, x):
    for i in range(x.shape[0]):
        out[i] = vmath.exp(x[i])


@njit(cache=True, fastmath=vmath.CONTRACT)
def _act_dact_all(a, da, x, kind):
    for i in range(x.shape[0]):
        a[i], da[i] = _act_dact(x[i], kind)


def _exp32(x):
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    _exp_all(out, x)
    return out


def test_exp_float32_within_2_ulp_where_the_result_is_normal():
    x = np.linspace(-87.6, 88.37, 1_000_003, dtype=np.float32)
    got, ref = _exp32(x).astype(np.float64), np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - ref) / ulp) <= 2.0
    assert _exp32([0.0])[0] == 1.0


def test_exp_float32_saturates_and_keeps_nan():
    got = _exp32([-np.inf, -1e30, -104.0, -88.0, 88.38, 89.0, 1e30, np.inf, np.nan])
    np.testing.assert_array_equal(got[:4], 0.0)
    np.testing.assert_array_equal(got[4:8], np.inf)
    assert np.isnan(got[8])


def test_sigmoid_silu_gelu_tanh_float32_match_float64_everywhere():
    """The float32 rules (one exp, one division) against the float64 formulas, far tails
    included: finite, and with a derivative to match (GELU's x^3 overflows float32 past
    ~1e12, where its derivative is NaN as it always was, so its range stops short)."""
    x32 = np.concatenate([np.linspace(-100, 100, 20001), [-1e10, 1e10]]).astype(np.float32)
    xd = x32.astype(np.float64)
    sig = 0.5 * (1 + np.tanh(0.5 * xd))
    u = np.sqrt(2 / np.pi) * (xd + 0.044715 * xd ** 3)
    th = np.tanh(u)
    refs = {
        SIGMOID: (sig, sig * (1 - sig)),
        SILU: (xd * sig, sig * (1 + xd * (1 - sig))),
        GELU_TANH: (0.5 * xd * (1 + th), 0.5 * (1 + th) + 0.5 * xd * (1 - th ** 2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * xd ** 2)),
    }
    for kind, (ref_a, ref_da) in refs.items():
        a, da = np.empty_like(x32), np.empty_like(x32)
        _act_dact_all(a, da, x32, kind)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(da)), kind
        np.testing.assert_allclose(a, ref_a, rtol=3e-6, atol=1e-6, err_msg=str(kind))
        np.testing.assert_allclose(da, ref_da, rtol=3e-6, atol=1e-6, err_msg=str(kind))
