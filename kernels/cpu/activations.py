"""Pointwise activations on flat arrays."""
import numpy as np
from numba import njit, prange

GELU_SCALE = np.sqrt(2.0 / np.pi)


@njit(parallel=True, cache=True)
def gelu_forward(out, inp):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    for i in prange(inp.shape[0]):
        x = inp[i]
        u = GELU_SCALE * (x + 0.044715 * x * x * x)
        out[i] = 0.5 * x * (1.0 + np.tanh(u))


@njit(parallel=True, cache=True)
def gelu_backward(dinp, dout, inp):
    """Accumulate dinp += gelu'(x) * dout."""
    for i in prange(inp.shape[0]):
        x = inp[i]
        u = GELU_SCALE * (x + 0.044715 * x * x * x)
        th = np.tanh(u)
        sech2 = 1.0 - th * th
        local = 0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
        dinp[i] += local * dout[i]
