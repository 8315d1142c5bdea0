"""LayerNorm over the last axis of (N, C) rows: out = (x - mean) * rstd * weight + bias.

Device math is in the input's dtype (float32 on a float32 model): literals go through
`dt(...)` so a float32 kernel never promotes to float64.
"""
import math

from numba import cuda

from . import reduce
from .launch import THREADS, block_sum, blocks, shared_bytes


@cuda.jit(cache=True)
def _layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """One block per row (grid-stride over rows); threads stride over the channels."""
    dt = inp.dtype.type
    buf = cuda.shared.array(0, inp.dtype)  # blockDim.x values, sized at launch
    N, C = inp.shape
    has_bias = bias.shape[0] > 0
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        s = dt(0)
        for c in range(tid, C, cuda.blockDim.x):
            s += inp[n, c]
        m = block_sum(buf, s) / dt(C)
        s = dt(0)
        for c in range(tid, C, cuda.blockDim.x):
            d = inp[n, c] - m
            s += d * d
        r = dt(1) / math.sqrt(block_sum(buf, s) / dt(C) + dt(eps))
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
    dt = inp.dtype.type
    buf = cuda.shared.array(0, inp.dtype)
    N, C = inp.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m = mean[n]
        r = rstd[n]
        s1 = dt(0)
        s2 = dt(0)
        for c in range(tid, C, cuda.blockDim.x):
            dnorm = dout[n, c] * weight[c]
            s1 += dnorm
            s2 += dnorm * (inp[n, c] - m) * r
        dnorm_mean = block_sum(buf, s1) / dt(C)
        dnorm_norm_mean = block_sum(buf, s2) / dt(C)
        for c in range(tid, C, cuda.blockDim.x):
            xhat = (inp[n, c] - m) * r
            dinp[n, c] += (dout[n, c] * weight[c] - dnorm_mean - xhat * dnorm_norm_mean) * r


@cuda.jit(cache=True)
def _layernorm_params_partial(partial, dout, inp, mean, rstd, rows_per_chunk):
    """Stage 1 of the weight/bias grads (reduce.py): partial[0, k, c] = sum of dy * xhat and
    partial[1, k, c] = sum of dy over row chunk k."""
    dt = inp.dtype.type
    N, C = inp.shape
    K = partial.shape[1]
    tiles = (C + cuda.blockDim.x - 1) // cuda.blockDim.x
    for task in range(cuda.blockIdx.x, K * tiles, cuda.gridDim.x):
        k = task // tiles
        c = task % tiles * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            sw = dt(0)
            sb = dt(0)
            for n in range(k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk)):
                sw += dout[n, c] * (inp[n, c] - mean[n]) * rstd[n]
                sb += dout[n, c]
            partial[0, k, c] = sw
            partial[1, k, c] = sb


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """Normalise each row; save mean and 1/std for the backward. bias may be empty."""
    _layernorm_forward[blocks(inp.shape[0], 1), THREADS, 0, shared_bytes(inp.dtype)](
        out, mean, rstd, inp, weight, bias, eps)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate input, weight and bias grads. dweight / dbias may be empty (frozen or no
    bias): skipped."""
    N, C = inp.shape
    _layernorm_backward_input[blocks(N, 1), THREADS, 0, shared_bytes(inp.dtype)](dinp, dout, inp, weight, mean, rstd)
    if dweight.shape[0] or dbias.shape[0]:
        n_chunks, rows = reduce.chunks(N)
        partial = reduce.partials(2, N, C, inp.dtype)
        _layernorm_params_partial[reduce.stage1_grid(n_chunks, C), THREADS](partial, dout, inp, mean, rstd, rows)
        if dweight.shape[0]:
            reduce.sum_partials(dweight, partial[0])
        if dbias.shape[0]:
            reduce.sum_partials(dbias, partial[1])
