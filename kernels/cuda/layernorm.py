"""LayerNorm over the last axis of (N, C) rows: out = (x - mean) * rstd * weight + bias.

Device math is in the input's dtype (float32 on a float32 model): literals go through
`dt(...)` so a float32 kernel never promotes to float64.
"""
import math

from numba import cuda

from . import reduce
from .launch import THREADS, block_sum, blocks, shared_bytes


@cuda.jit(device=True, cache=True)
def _normalize_row(out, mean, rstd, inp, weight, bias, eps, n, m, buf):
    """Row n of inp with its mean m known: the variance, out[n] and the saved statistics.
    Every thread of the block calls it; each reads the channels c = tid, tid + blockDim..."""
    dt = inp.dtype.type
    C = inp.shape[1]
    has_bias = bias.shape[0] > 0
    tid = cuda.threadIdx.x
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
def _layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """One block per row (grid-stride over rows); threads stride over the channels."""
    dt = inp.dtype.type
    buf = cuda.shared.array(0, inp.dtype)  # blockDim.x values, sized at launch
    N, C = inp.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        s = dt(0)
        for c in range(tid, C, cuda.blockDim.x):
            s += inp[n, c]
        _normalize_row(out, mean, rstd, inp, weight, bias, eps, n, block_sum(buf, s) / dt(C), buf)


@cuda.jit(cache=True)
def _residual_layernorm_forward(out, mean, rstd, h, x, weight, bias, eps):
    """h += x, then layernorm of h, one block per row: the sum is written and summed for
    the mean in one read of h and x (each thread later rereads only its own channels)."""
    dt = h.dtype.type
    buf = cuda.shared.array(0, h.dtype)
    N, C = h.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        s = dt(0)
        for c in range(tid, C, cuda.blockDim.x):
            v = h[n, c] + x[n, c]
            h[n, c] = v
            s += v
        _normalize_row(out, mean, rstd, h, weight, bias, eps, n, block_sum(buf, s) / dt(C), buf)


@cuda.jit(device=True, cache=True)
def _input_grad_row(dinp, dres, has_res, dout, inp, weight, mean, rstd, n, buf):
    """dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)) into dinp[n]; with
    has_res, dres[n] += the updated dinp[n] too (a residual's pass-through grad)."""
    dt = inp.dtype.type
    C = inp.shape[1]
    tid = cuda.threadIdx.x
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
        d = dinp[n, c] + (dout[n, c] * weight[c] - dnorm_mean - xhat * dnorm_norm_mean) * r
        dinp[n, c] = d
        if has_res:
            dres[n, c] += d


@cuda.jit(cache=True)
def _layernorm_backward_input(dinp, dout, inp, weight, mean, rstd):
    """The input grad, one block per row."""
    buf = cuda.shared.array(0, inp.dtype)
    for n in range(cuda.blockIdx.x, inp.shape[0], cuda.gridDim.x):
        _input_grad_row(dinp, dinp, False, dout, inp, weight, mean, rstd, n, buf)


@cuda.jit(cache=True)
def _residual_layernorm_backward_input(dh, dx, dout, h, weight, mean, rstd):
    """The sum's grad dh += the norm's input grad, then dx += dh, one block per row."""
    buf = cuda.shared.array(0, h.dtype)
    for n in range(cuda.blockIdx.x, h.shape[0], cuda.gridDim.x):
        _input_grad_row(dh, dx, True, dout, h, weight, mean, rstd, n, buf)


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


def _param_grads(dweight, dbias, dout, inp, mean, rstd):
    """Weight and bias grads (either may be empty: skipped), deterministic in two stages."""
    N, C = inp.shape
    if dweight.shape[0] or dbias.shape[0]:
        n_chunks, rows = reduce.chunks(N)
        partial = reduce.partials(2, N, C, inp.dtype)
        _layernorm_params_partial[reduce.stage1_grid(n_chunks, C), THREADS](partial, dout, inp, mean, rstd, rows)
        if dweight.shape[0]:
            reduce.sum_partials(dweight, partial[0])
        if dbias.shape[0]:
            reduce.sum_partials(dbias, partial[1])


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate input, weight and bias grads. dweight / dbias may be empty (frozen or no
    bias): skipped."""
    _layernorm_backward_input[blocks(inp.shape[0], 1), THREADS, 0, shared_bytes(inp.dtype)](
        dinp, dout, inp, weight, mean, rstd)
    _param_grads(dweight, dbias, dout, inp, mean, rstd)


def residual_layernorm_forward(out, mean, rstd, h, x, weight, bias, eps):
    """h += x (the residual sum, in h's memory), then out = layernorm(h), one pass per row.
    x may be empty (0 rows): no residual, as the CPU kernel."""
    if x.shape[0] == 0:
        return layernorm_forward(out, mean, rstd, h, weight, bias, eps)
    _residual_layernorm_forward[blocks(h.shape[0], 1), THREADS, 0, shared_bytes(h.dtype)](
        out, mean, rstd, h, x, weight, bias, eps)


def residual_layernorm_backward(dh, dx, dweight, dbias, dout, h, weight, mean, rstd):
    """dh (the sum's grad) += the norm's input grad, then dx += dh, one pass per row; the
    weight/bias grads as layernorm_backward's. dx may be empty (0 rows): no residual."""
    if dx.shape[0] == 0:
        return layernorm_backward(dh, dweight, dbias, dout, h, weight, mean, rstd)
    _residual_layernorm_backward_input[blocks(h.shape[0], 1), THREADS, 0, shared_bytes(h.dtype)](
        dh, dx, dout, h, weight, mean, rstd)
    _param_grads(dweight, dbias, dout, h, mean, rstd)
