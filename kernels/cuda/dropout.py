"""Inverted dropout with the CPU's counter-based RNG: the same mask bit for bit.

Element i is kept when uniform(key, i) >= p (SplitMix64's finaliser on (key, i)), so the
mask depends only on the key and the index: the backward regenerates it, nothing stored.
"""
import numpy as np
from numba import cuda

from .launch import THREADS, blocks

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53


@cuda.jit(device=True, cache=True)
def _uniform(key, i):
    """A uniform float64 in [0, 1) from a uint64 key and an element index."""
    z = key + np.uint64(i + 1) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) * TO_UNIT


@cuda.jit(cache=True)
def _dropout(dst, src, p, key, accumulate):
    scale = src.dtype.type(1.0 / (1.0 - p))
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        kept = _uniform(key, i) >= p  # float64, as the CPU: identical masks
        if accumulate:
            if kept:
                dst[i] += src[i] * scale
        else:
            dst[i] = src[i] * scale if kept else src.dtype.type(0)


def dropout_forward(out, inp, p, key):
    """out = inp * mask / (1 - p), mask_i = uniform(key, i) >= p."""
    _dropout[blocks(inp.shape[0]), THREADS](out, inp, p, np.uint64(key), False)


def dropout_backward(dinp, dout, p, key):
    """Accumulate dinp += dout * mask / (1 - p), the forward's mask regenerated."""
    _dropout[blocks(dout.shape[0]), THREADS](dinp, dout, p, np.uint64(key), True)
