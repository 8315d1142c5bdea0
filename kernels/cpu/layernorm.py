"""LayerNorm over the last axis of (N, C) rows: out = (x - mean) * rstd * weight + bias.

The residual connection before a pre-LN block's norm (x = x + h; n = layernorm(x)) fuses
into the same row pass (residual_layernorm_*): the plain and the fused kernels are one
parameterised kernel, so they give the same bits.
"""
import numpy as np
from numba import njit, prange

from .vmath import like

COL_BLOCK = 64  # columns per parallel task when reducing weight/bias grads over rows
REDUCE = {"reassoc", "contract"}  # lets the row sums vectorise; no other fast-math license


# The residual kernels are the parallel kernels themselves; the plain ones call them with
# an empty residual. Every @njit entry point around a parallel kernel links its code and
# optimises it again (~0.2-0.5 s each on a cold start), so nt.ops calls the residual
# kernels for the plain norm too (an empty residual made once): a step compiles no
# wrapper. The plain entry points stay for direct callers.
@njit(parallel=True, cache=True, fastmath=REDUCE)
def residual_layernorm_forward(out, mean, rstd, h, x, weight, bias, eps):
    """h += x (the residual sum, in h's memory), then out = layernorm(h), in one pass per
    row; saves mean and 1/std. Equal bit for bit to add_forward then layernorm_forward.
    x may be empty (0 rows): no residual, h is normalised as it is."""
    N, C = h.shape
    has_res = x.shape[0] > 0
    has_bias = bias.shape[0] > 0
    for n in prange(N):
        row = h[n]
        m = 0.0
        if has_res:
            r = x[n]
            for c in range(C):
                row[c] = row[c] + r[c]
                m += row[c]
        else:
            for c in range(C):
                m += row[c]
        m /= C
        var = 0.0
        for c in range(C):
            d = row[c] - m
            var += d * d
        var /= C
        s = 1.0 / np.sqrt(var + eps)
        # sums in float64, the row's arithmetic in its own type (8 float32 lanes, not 4)
        mt, st = like(row[0], m), like(row[0], s)
        o = out[n]
        for c in range(C):
            o[c] = (row[c] - mt) * st * weight[c]
            if has_bias:
                o[c] += bias[c]
        mean[n] = m
        rstd[n] = s


@njit(parallel=True, cache=True, fastmath=REDUCE)
def residual_layernorm_backward(dh, dx, dweight, dbias, dout, h, weight, mean, rstd):
    """The backward of residual_layernorm_forward, h now holding the sum: dh (the sum's
    grad, holding what its other readers gave) += the norm's input grad, then dx += dh,
    in one pass per row; dx may be empty (no residual). dweight / dbias may be empty
    (frozen or no bias): that grad is skipped.

    dh += rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)), per row; the weight and
    bias grads sum over rows, done in a second pass that gives each task a block of
    columns, so the result does not depend on the thread count.
    """
    N, C = h.shape
    has_res = dx.shape[0] > 0
    for n in prange(N):
        x = h[n]
        dy = dout[n]
        m = mean[n]
        s = rstd[n]
        dnorm_mean = 0.0  # float64 sums
        dnorm_norm_mean = 0.0
        for c in range(C):
            xhat = (x[c] - m) * s
            dnorm = dy[c] * weight[c]
            dnorm_mean += dnorm
            dnorm_norm_mean += dnorm * xhat
        a = like(m, dnorm_mean / C)
        b = like(m, dnorm_norm_mean / C)
        d = dh[n]
        for c in range(C):
            xhat = (x[c] - m) * s
            d[c] += (dy[c] * weight[c] - a - xhat * b) * s
        if has_res:
            dr = dx[n]
            for c in range(C):
                dr[c] += d[c]
    has_weight = dweight.shape[0] > 0
    has_bias = dbias.shape[0] > 0
    if not (has_weight or has_bias):
        return
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        # row and grad slices, one loop per grad: indexing dout[n, c] / dweight[c] with
        # both grads in one loop kept LLVM from vectorising it (4x slower, 1.56 -> 0.41 ms
        # for 2048 x 384 on one core).
        c0 = blk * COL_BLOCK
        c1 = min(c0 + COL_BLOCK, C)
        dw = dweight[c0:c1] if has_weight else dweight[:0]
        db = dbias[c0:c1] if has_bias else dbias[:0]
        for n in range(N):
            m = mean[n]
            s = rstd[n]
            dy = dout[n, c0:c1]
            x = h[n, c0:c1]
            for c in range(dw.shape[0]):
                dw[c] += dy[c] * (x[c] - m) * s
            for c in range(db.shape[0]):
                db[c] += dy[c]


@njit(cache=True)
def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """Normalise each row; save mean and 1/std for the backward. bias may be empty."""
    residual_layernorm_forward(out, mean, rstd, inp, inp[:0], weight, bias, eps)


@njit(cache=True)
def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate input, weight and bias grads. dweight / dbias may be empty (frozen or
    no bias): that grad is skipped."""
    residual_layernorm_backward(dinp, dinp[:0], dweight, dbias, dout, inp, weight, mean, rstd)
