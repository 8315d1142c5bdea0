"""LayerNorm over the last axis of (N, C) rows: out = (x - mean) * rstd * weight + bias."""
import math

import numpy as np
from numba import cuda

from .launch import THREADS, block_sum, blocks


@cuda.jit(cache=True)
def _layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """One block per row (grid-stride over rows); threads stride over the channels."""
    buf = cuda.shared.array(THREADS, np.float64)
    N, C = inp.shape
    has_bias = bias.shape[0] > 0
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        s = 0.0
        for c in range(tid, C, cuda.blockDim.x):
            s += inp[n, c]
        m = block_sum(buf, s) / C
        s = 0.0
        for c in range(tid, C, cuda.blockDim.x):
            d = inp[n, c] - m
            s += d * d
        r = 1.0 / math.sqrt(block_sum(buf, s) / C + eps)
        for c in range(tid, C, cuda.blockDim.x):
            o = (inp[n, c] - m) * r * weight[c]
            if has_bias:
                o += bias[c]
            out[n, c] = o
        if tid == 0:
            mean[n] = m
            rstd[n] = r


@cuda.jit(cache=True)
def _layernorm_backward_input(dinp, dout, inp, weight, mean, rstd):
    """dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)), one block per row."""
    buf = cuda.shared.array(THREADS, np.float64)
    N, C = inp.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m = mean[n]
        r = rstd[n]
        s1 = 0.0
        s2 = 0.0
        for c in range(tid, C, cuda.blockDim.x):
            dnorm = dout[n, c] * weight[c]
            s1 += dnorm
            s2 += dnorm * (inp[n, c] - m) * r
        dnorm_mean = block_sum(buf, s1) / C
        dnorm_norm_mean = block_sum(buf, s2) / C
        for c in range(tid, C, cuda.blockDim.x):
            xhat = (inp[n, c] - m) * r
            dinp[n, c] += (dout[n, c] * weight[c] - dnorm_mean - xhat * dnorm_norm_mean) * r


@cuda.jit(cache=True)
def _layernorm_backward_params(dweight, dbias, dout, inp, mean, rstd):
    """dweight[c] += sum_n dy * xhat, dbias[c] += sum_n dy: one thread per channel walks
    all rows, so each grad element has a single writer (no atomics, fixed order)."""
    N, C = inp.shape
    has_weight = dweight.shape[0] > 0
    has_bias = dbias.shape[0] > 0
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        sw = 0.0
        sb = 0.0
        for n in range(N):
            sw += dout[n, c] * (inp[n, c] - mean[n]) * rstd[n]
            sb += dout[n, c]
        if has_weight:
            dweight[c] += sw
        if has_bias:
            dbias[c] += sb


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """Normalise each row; save mean and 1/std for the backward. bias may be empty."""
    _layernorm_forward[blocks(inp.shape[0], 1), THREADS](out, mean, rstd, inp, weight, bias, eps)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate input, weight and bias grads. dweight / dbias may be empty (frozen or no
    bias): skipped."""
    N, C = inp.shape
    _layernorm_backward_input[blocks(N, 1), THREADS](dinp, dout, inp, weight, mean, rstd)
    if dweight.shape[0] or dbias.shape[0]:
        _layernorm_backward_params[blocks(C), THREADS](dweight, dbias, dout, inp, mean, rstd)
