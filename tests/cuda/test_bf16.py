"""float32 <-> bf16 conversions on the CUDA backend: round-to-nearest-even bit-exact against a
NumPy reference on the edge cases, stochastic rounding unbiased, the inverse exact."""
import numpy as np
import pytest

import nt
from nt.kernels.cpu import quant as cpu_quant
from nt.kernels.cuda import bf16

gpu = nt.backend("cuda")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")  # the random bits' hash under the simulator


def _edge_bits():
    """float32 bit patterns where rounding to bf16 can go wrong, both signs."""
    b = [0x00000000, 0x00000001, 0x00007FFF, 0x00008000, 0x00018000, 0x0000FFFF, 0x007FFFFF,  # zero, subnormals
         0x00800000, 0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x3F80FFFF,  # ties, near ties
         0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000,                                     # to the max, inf
         0x7F800001, 0x7F808000, 0x7FC00000, 0x7FFFFFFF, 0x7FBFFFFF]                         # NaNs
    b = np.array(b, np.uint32)
    rng = np.random.default_rng(0)
    return np.concatenate([b, b | 0x80000000, rng.integers(0, 2 ** 32, 200, dtype=np.uint32)])


def _rne_reference(bits):
    """bf16 bits by choosing, in float64, the nearer of the two bf16 neighbours (ties: the
    even one; the neighbour past the largest bf16 counts as 2^128, so halfway and beyond
    round to inf); NaN -> the input's top bits with the quiet bit set."""
    with np.errstate(invalid="ignore"):                        # signalling NaNs among the inputs
        x = bits.view(np.float32).astype(np.float64)
        lo = bits >> 16                                            # truncation: toward zero
        hi = lo + 1
        v_lo = (lo << 16).view(np.float32).astype(np.float64)
        v_hi = np.where(hi & 0x7FFF == 0x7F80, np.copysign(2.0 ** 128, x),
                        (hi << 16).view(np.float32).astype(np.float64))
        d_lo, d_hi = np.abs(x - v_lo), np.abs(v_hi - x)            # NaN for NaN inputs, set below
    out = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (lo & 1 == 1)), hi, lo)
    nan = np.isnan(x)
    out[nan] = (bits[nan] >> 16) | 0x40
    return out.astype(np.uint16)


def _convert(fn, x, *args):
    out = gpu.empty(x.size, np.uint16)
    fn(out, gpu.to_device(x), *args)
    return gpu.to_host(out)


def test_round_to_nearest_even_is_bit_exact_on_edge_cases():
    bits = _edge_bits()
    got = _convert(bf16.to_bf16, bits.view(np.float32))
    np.testing.assert_array_equal(got, _rne_reference(bits))
    cpu = np.empty(bits.size, np.uint16)
    cpu_quant.quantize_bf16(cpu, bits)                          # the CPU's twin agrees bit for bit
    np.testing.assert_array_equal(got, cpu)
    assert got[list(_edge_bits()[:23]).index(0x7F800001)] & 0x7FFF > 0x7F80   # a NaN, not inf


def test_from_bf16_is_exact_and_inverts_rounding_of_bf16_values():
    b = np.arange(0, 65536, 7, dtype=np.uint16)
    out = gpu.empty(b.size, np.float32)
    bf16.from_bf16(out, gpu.to_device(b))
    got = gpu.to_host(out)
    np.testing.assert_array_equal(got.view(np.uint32), b.astype(np.uint32) << 16)
    finite = np.isfinite(got)
    np.testing.assert_array_equal(_convert(bf16.to_bf16, got[finite]), b[finite])
    np.testing.assert_array_equal(_convert(bf16.to_bf16_stochastic, got[finite], 5), b[finite])  # nothing to round


def test_stochastic_rounding_is_unbiased():
    """Values a third, a half and 0.9 of an ulp above a bf16 value (and negated): each result
    is one of the two neighbours, and over 2048 draws the mean is the input within 4 standard
    errors (an ulp / (2 sqrt(n)) bounds one)."""
    n = 2048
    base = np.float32(1.5)
    ulp = 2.0 ** -7                                            # bf16 spacing in [1, 2)
    for frac in (1 / 3, 0.5, 0.9):
        for sign in (1, -1):
            x = np.full(n, sign * (base + frac * ulp), np.float32)
            got = _convert(bf16.to_bf16_stochastic, x, 12345)
            vals = (got.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            assert set(np.abs(vals)) <= {1.5, 1.5 + ulp}
            assert abs(vals.mean() - x[0]) < 4 * ulp / (2 * np.sqrt(n)), (frac, sign, vals.mean(), x[0])
    again = _convert(bf16.to_bf16_stochastic, x, 12345)
    other = _convert(bf16.to_bf16_stochastic, x, 54321)
    assert np.array_equal(got, again) and not np.array_equal(got, other)  # keyed, and the key matters


def test_bad_arguments_are_refused():
    x = gpu.to_device(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="to_bf16"):
        bf16.to_bf16(gpu.empty(4, np.float32), x)              # out must be uint16 bits
    with pytest.raises(ValueError, match="from_bf16"):
        bf16.from_bf16(gpu.empty(3, np.float32), gpu.empty(4, np.uint16))
