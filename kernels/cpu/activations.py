"""Pointwise activations, gated (GLU) activations and their backwards, on flat arrays.

One scalar rule per activation (`_act`, `_dact`) serves every kernel here, chosen by an
integer `kind`: GELU_TANH (GPT-2, Gemma's GeGLU), GELU (exact, erf), SILU, SIGMOID.

Gated layout: `glu_*` take one (N, 2H) input, the gate in columns [0, H) and the up
projection in [H, 2H), and produce (N, H) = act(gate) * up. A Llama MLP computes both
halves with one fused (2H, C) linear, then this kernel: SwiGLU is kind SILU, GeGLU GELU_TANH.
"""
import math

import numpy as np
from numba import njit, prange

from . import vmath
from .vmath import like

GELU_TANH, GELU, SILU, SIGMOID = 0, 1, 2, 3
GELU_SCALE = np.sqrt(2.0 / np.pi)
INV_SQRT2 = 1.0 / np.sqrt(2.0)
INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


@njit(cache=True, inline="always")
def _sigmoid(x):
    # exp of a non-positive number stays finite for any x; one division for both signs
    # (a select picks the numerator), so a float32 loop stays one vector path.
    one = like(x, 1.0)
    e = vmath.exp(-abs(x))
    return (one if x >= 0 else e) / (one + e)


@njit(cache=True, inline="always")
def _gelu_tanh_gate(x):
    """GELU_TANH's 0.5 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), as sigmoid(2u)
    (the same function): one exp and one division, no tanh on top of them."""
    return _sigmoid(like(x, 2.0 * GELU_SCALE) * (x + like(x, 0.044715) * x * x * x))


@njit(cache=True, inline="always")
def _act(x, kind):
    """The activation of one value, computed in x's float type."""
    half, one = like(x, 0.5), like(x, 1.0)
    if kind == GELU_TANH:
        return x * _gelu_tanh_gate(x)
    if kind == GELU:
        return half * x * (one + math.erf(x * like(x, INV_SQRT2)))
    if kind == SILU:
        return x * _sigmoid(x)
    return _sigmoid(x)


@njit(cache=True, inline="always")
def _act_dact(x, kind):
    """(the activation, its derivative) at one value, in x's float type: one rule per kind
    for both, sharing the erf or sigmoid (a gated backward needs the two; inlining one
    rule instead of two halves the code LLVM compiles for it)."""
    half, one = like(x, 0.5), like(x, 1.0)
    if kind == GELU_TANH:
        # d/dx x s(2u) = s + x 2 s (1 - s) u'; u' = sqrt(2/pi) (1 + 3 0.044715 x^2)
        s = _gelu_tanh_gate(x)
        return x * s, s + x * s * (one - s) * like(x, 2.0 * GELU_SCALE) * (one + like(x, 3.0 * 0.044715) * x * x)
    if kind == GELU:
        cdf = half * (one + math.erf(x * like(x, INV_SQRT2)))
        return x * cdf, cdf + x * like(x, INV_SQRT_2PI) * vmath.exp(-half * x * x)
    sg = _sigmoid(x)
    if kind == SILU:
        return x * sg, sg * (one + x * (one - sg))
    return sg, sg * (one - sg)


@njit(cache=True, inline="always")
def _dact(x, kind):
    """The activation's derivative at one value, computed in x's float type."""
    return _act_dact(x, kind)[1]


@njit(parallel=True, cache=True, fastmath=vmath.CONTRACT)
def act_forward(out, inp, kind):
    """out = act(inp), elementwise."""
    for i in prange(inp.shape[0]):
        out[i] = _act(inp[i], kind)


@njit(parallel=True, cache=True, fastmath=vmath.CONTRACT)
def act_backward(dinp, dout, inp, kind):
    """Accumulate dinp += act'(inp) * dout."""
    for i in prange(inp.shape[0]):
        dinp[i] += _dact(inp[i], kind) * dout[i]


@njit(parallel=True, cache=True, fastmath=vmath.CONTRACT)
def gelu_forward(out, inp):
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    for i in prange(inp.shape[0]):
        out[i] = _act(inp[i], GELU_TANH)


@njit(parallel=True, cache=True, fastmath=vmath.CONTRACT)
def gelu_backward(dinp, dout, inp):
    """Accumulate dinp += gelu'(x) * dout."""
    for i in prange(inp.shape[0]):
        dinp[i] += _dact(inp[i], GELU_TANH) * dout[i]


@njit(parallel=True, cache=True, fastmath=vmath.CONTRACT)
def glu_forward(out, inp, kind):
    """out (N, H) = act(inp[:, :H]) * inp[:, H:]."""
    N, H = out.shape
    for n in prange(N):
        for j in range(H):
            out[n, j] = _act(inp[n, j], kind) * inp[n, H + j]


@njit(parallel=True, cache=True, fastmath=vmath.CONTRACT)
def glu_backward(dinp, dout, inp, kind):
    """Accumulate d gate += act'(gate) * up * dout and d up += act(gate) * dout."""
    N, H = dout.shape
    for n in prange(N):
        for j in range(H):
            a, da = _act_dact(inp[n, j], kind)
            dinp[n, j] += da * inp[n, H + j] * dout[n, j]
            dinp[n, H + j] += a * dout[n, j]
