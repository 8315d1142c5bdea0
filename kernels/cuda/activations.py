"""Pointwise activations on flat device arrays."""
import math

from numba import cuda

from .launch import THREADS, blocks

GELU_SCALE = math.sqrt(2.0 / math.pi)


@cuda.jit(cache=True)
def _gelu_forward(out, inp):
    for i in range(cuda.grid(1), inp.shape[0], cuda.gridsize(1)):
        x = inp[i]
        u = GELU_SCALE * (x + 0.044715 * x * x * x)
        out[i] = 0.5 * x * (1.0 + math.tanh(u))


@cuda.jit(cache=True)
def _gelu_backward(dinp, dout, inp):
    for i in range(cuda.grid(1), inp.shape[0], cuda.gridsize(1)):
        x = inp[i]
        u = GELU_SCALE * (x + 0.044715 * x * x * x)
        th = math.tanh(u)
        sech2 = 1.0 - th * th
        local = 0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
        dinp[i] += local * dout[i]


def gelu_forward(out, inp):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    _gelu_forward[blocks(inp.shape[0]), THREADS](out, inp)


def gelu_backward(dinp, dout, inp):
    """Accumulate dinp += gelu'(x) * dout."""
    _gelu_backward[blocks(inp.shape[0]), THREADS](dinp, dout, inp)
