"""Pointwise and gated (GLU) activations on device arrays (see the CPU twin).

One scalar rule per activation (`_act`, `_dact`, device functions) chosen by an integer
`kind` with the CPU's codes: GELU_TANH (GPT-2), GELU (erf), SILU, SIGMOID. `glu_*` take
(N, 2H) rows, gate in [0, H) and up in [H, 2H), and give (N, H) = act(gate) * up.
"""
import math

from numba import cuda

from .fmath import like
from .launch import THREADS, blocks

GELU_TANH, GELU, SILU, SIGMOID = 0, 1, 2, 3
GELU_SCALE = math.sqrt(2.0 / math.pi)
INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@cuda.jit(device=True, cache=True)
def _sigmoid(x):
    # both branches stay finite for any x (exp of a non-positive number)
    one = like(x, 1.0)
    if x >= 0:
        return one / (one + math.exp(-x))
    e = math.exp(x)
    return e / (one + e)


@cuda.jit(device=True, cache=True)
def _act(x, kind):
    """The activation of one value, in x's float type."""
    half, one = like(x, 0.5), like(x, 1.0)
    if kind == GELU_TANH:
        return half * x * (one + math.tanh(like(x, GELU_SCALE) * (x + like(x, 0.044715) * x * x * x)))
    if kind == GELU:
        return half * x * (one + math.erf(x * like(x, INV_SQRT2)))
    if kind == SILU:
        return x * _sigmoid(x)
    return _sigmoid(x)


@cuda.jit(device=True, cache=True)
def _dact(x, kind):
    """The activation's derivative at one value, in x's float type."""
    half, one = like(x, 0.5), like(x, 1.0)
    if kind == GELU_TANH:
        th = math.tanh(like(x, GELU_SCALE) * (x + like(x, 0.044715) * x * x * x))
        sech2 = one - th * th
        return half * (one + th) + half * x * sech2 * like(x, GELU_SCALE) * (one + like(x, 3.0 * 0.044715) * x * x)
    if kind == GELU:
        return half * (one + math.erf(x * like(x, INV_SQRT2))) + x * like(x, INV_SQRT_2PI) * math.exp(-half * x * x)
    sg = _sigmoid(x)
    if kind == SILU:
        return sg * (one + x * (one - sg))
    return sg * (one - sg)


@cuda.jit(cache=True)
def _act_forward(out, inp, kind):
    for i in range(cuda.grid(1), inp.shape[0], cuda.gridsize(1)):
        out[i] = _act(inp[i], kind)


@cuda.jit(cache=True)
def _act_backward(dinp, dout, inp, kind):
    for i in range(cuda.grid(1), inp.shape[0], cuda.gridsize(1)):
        dinp[i] += _dact(inp[i], kind) * dout[i]


@cuda.jit(cache=True)
def _glu_forward(out, inp, kind):
    N, H = out.shape
    for i in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = i // H
        j = i % H
        out[n, j] = _act(inp[n, j], kind) * inp[n, H + j]


@cuda.jit(cache=True)
def _glu_backward(dinp, dout, inp, kind):
    N, H = dout.shape
    for i in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = i // H
        j = i % H
        g = inp[n, j]
        dinp[n, j] += _dact(g, kind) * inp[n, H + j] * dout[n, j]
        dinp[n, H + j] += _act(g, kind) * dout[n, j]


def act_forward(out, inp, kind):
    """out = act(inp), elementwise."""
    _act_forward[blocks(inp.shape[0]), THREADS](out, inp, kind)


def act_backward(dinp, dout, inp, kind):
    """Accumulate dinp += act'(inp) * dout."""
    _act_backward[blocks(inp.shape[0]), THREADS](dinp, dout, inp, kind)


def gelu_forward(out, inp):
    """GELU, tanh approximation (GPT-2)."""
    act_forward(out, inp, GELU_TANH)


def gelu_backward(dinp, dout, inp):
    """Accumulate dinp += gelu'(x) * dout."""
    act_backward(dinp, dout, inp, GELU_TANH)


def glu_forward(out, inp, kind):
    """out (N, H) = act(inp[:, :H]) * inp[:, H:]."""
    _glu_forward[blocks(out.size), THREADS](out, inp, kind)


def glu_backward(dinp, dout, inp, kind):
    """Accumulate d gate += act'(gate) * up * dout and d up += act(gate) * dout."""
    _glu_backward[blocks(dout.size), THREADS](dinp, dout, inp, kind)
