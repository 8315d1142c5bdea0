"""LayerNorm over the last axis of (N, C) rows: out = (x - mean) * rstd * weight + bias.

The residual connection before a pre-LN block's norm (x = x + h; n = layernorm(x)) fuses
into the same row pass (residual_layernorm_*): the plain and the fused kernels are one
parameterised kernel, so they give the same bits.
"""
import numpy as np
from numba import njit, prange

COL_BLOCK = 64  # columns per parallel task when reducing weight/bias grads over rows


@njit(parallel=True, cache=True)
def _forward(out, mean, rstd, inp, res, weight, bias, eps):
    """Normalise each row of inp; with res (N, C) not empty, first inp += res in the same
    pass (the residual sum, written in inp's memory, is what gets normalised)."""
    N, C = inp.shape
    has_res = res.shape[0] > 0
    has_bias = bias.shape[0] > 0
    for n in prange(N):
        x = inp[n]
        m = 0.0
        if has_res:
            r = res[n]
            for c in range(C):
                x[c] = x[c] + r[c]
                m += x[c]
        else:
            for c in range(C):
                m += x[c]
        m /= C
        var = 0.0
        for c in range(C):
            d = x[c] - m
            var += d * d
        var /= C
        s = 1.0 / np.sqrt(var + eps)
        o = out[n]
        for c in range(C):
            o[c] = (x[c] - m) * s * weight[c]
            if has_bias:
                o[c] += bias[c]
        mean[n] = m
        rstd[n] = s


@njit(parallel=True, cache=True)
def _backward(dinp, dres, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate input, weight and bias grads; with dres (N, C) not empty, also
    dres += dinp after dinp got the norm's share (the residual's pass-through grad).

    dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)), per row; the weight and
    bias grads sum over rows, done in a second pass that gives each task a block of
    columns, so the result does not depend on the thread count.
    """
    N, C = inp.shape
    has_res = dres.shape[0] > 0
    for n in prange(N):
        x = inp[n]
        dy = dout[n]
        m = mean[n]
        s = rstd[n]
        dnorm_mean = 0.0
        dnorm_norm_mean = 0.0
        for c in range(C):
            xhat = (x[c] - m) * s
            dnorm = dy[c] * weight[c]
            dnorm_mean += dnorm
            dnorm_norm_mean += dnorm * xhat
        dnorm_mean /= C
        dnorm_norm_mean /= C
        dx = dinp[n]
        for c in range(C):
            xhat = (x[c] - m) * s
            dx[c] += (dy[c] * weight[c] - dnorm_mean - xhat * dnorm_norm_mean) * s
        if has_res:
            dr = dres[n]
            for c in range(C):
                dr[c] += dx[c]
    has_weight = dweight.shape[0] > 0
    has_bias = dbias.shape[0] > 0
    if not (has_weight or has_bias):
        return
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        c1 = min(c0 + COL_BLOCK, C)
        for n in range(N):
            m = mean[n]
            s = rstd[n]
            for c in range(c0, c1):
                if has_weight:
                    dweight[c] += dout[n, c] * (inp[n, c] - m) * s
                if has_bias:
                    dbias[c] += dout[n, c]


@njit(cache=True)
def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """Normalise each row; save mean and 1/std for the backward. bias may be empty."""
    _forward(out, mean, rstd, inp, inp[:0], weight, bias, eps)


@njit(cache=True)
def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Accumulate input, weight and bias grads. dweight / dbias may be empty (frozen or
    no bias): that grad is skipped."""
    _backward(dinp, dinp[:0], dweight, dbias, dout, inp, weight, mean, rstd)


@njit(cache=True)
def residual_layernorm_forward(out, mean, rstd, h, x, weight, bias, eps):
    """h += x (the residual sum, in h's memory), then out = layernorm(h), in one pass per
    row; saves mean and 1/std. Equal bit for bit to add_forward then layernorm_forward."""
    _forward(out, mean, rstd, h, x, weight, bias, eps)


@njit(cache=True)
def residual_layernorm_backward(dh, dx, dweight, dbias, dout, h, weight, mean, rstd):
    """The backward of residual_layernorm_forward, h now holding the sum: dh (the sum's
    grad, holding what its other readers gave) += the norm's input grad, then dx += dh,
    in one pass per row; weight/bias grads as layernorm_backward's."""
    _backward(dh, dx, dweight, dbias, dout, h, weight, mean, rstd)
