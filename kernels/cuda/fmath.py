"""Float math in the data's own type on the GPU.

Numba types a literal such as `0.5` as float64, and float32 * float64 is float64: a
float32 kernel written with plain literals runs its arithmetic in float64 (1/64 of the
float32 rate on consumer GPUs, 1/2 on an H100) and rounds differently from the float32
FMA path a GPU model is tested against. Kernels therefore write constants as
`like(x, 0.5)` (device functions, a value x of the data type) or `dt(0.5)` with
`dt = arr.dtype.type` (kernels); math.exp / tanh / erf / sqrt on a float32 lower to the
float32 libdevice functions.
"""
import numpy as np
from numba import types
from numba.cuda.extending import overload


def like(x, value):
    """`value` as a number of x's float type (the simulator runs this Python version)."""
    return type(x)(value)


@overload(like, inline="always")
def _like(x, value):
    if x == types.float32:
        return lambda x, value: np.float32(value)
    return lambda x, value: np.float64(value)
