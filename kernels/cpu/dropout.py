"""Inverted dropout with a counter-based RNG: no stored mask.

Element i is kept when uniform(key, i) >= p, and kept values are scaled by 1/(1-p).
uniform() hashes (key, i) with SplitMix64's finaliser, so the mask depends only on the
key (which the op derives from the seed, the training step and the call's index in the
forward) and the element index: reproducible, identical for any thread count, and the
backward regenerates it instead of reading a saved mask.
"""
import numpy as np
from numba import njit, prange

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53


@njit(cache=True)
def _uniform(key, i):
    """A uniform float64 in [0, 1) from a uint64 key and an element index."""
    z = key + np.uint64(i + 1) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) * TO_UNIT


@njit(parallel=True, cache=True)
def dropout_forward(out, inp, p, key):
    """out = inp * mask / (1 - p), mask_i = uniform(key, i) >= p."""
    scale = 1.0 / (1.0 - p)
    for i in prange(inp.shape[0]):
        out[i] = inp[i] * scale if _uniform(key, i) >= p else 0.0


@njit(parallel=True, cache=True)
def dropout_backward(dinp, dout, p, key):
    """Accumulate dinp += dout * mask / (1 - p), the forward's mask regenerated."""
    scale = 1.0 / (1.0 - p)
    for i in prange(dout.shape[0]):
        if _uniform(key, i) >= p:
            dinp[i] += dout[i] * scale
