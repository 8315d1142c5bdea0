"""RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * weight.

`rmsnorm_*` normalise (N, C) rows. `qk_norm_*` apply the same row rule to every query
and key head inside a fused (B, T, (NH + 2*NKV) * hs) qkv tensor (Qwen3, Gemma-3): one
weight of size hs shared by all query heads, another by all key heads; values pass
through unchanged. Both share the per-row helpers below, so the maths exists once.
"""
import numpy as np
from numba import njit, prange

COL_BLOCK = 64  # columns per parallel task when reducing weight grads over rows


@njit(cache=True)
def _row_forward(o, x, w, eps):
    """o = x * rstd * w for one row; returns rstd."""
    C = x.shape[0]
    ss = 0.0
    for c in range(C):
        ss += x[c] * x[c]
    s = 1.0 / np.sqrt(ss / C + eps)
    for c in range(C):
        o[c] = x[c] * s * w[c]
    return s


@njit(cache=True)
def _row_backward(dx, dy, x, w, s):
    """dx += s * (dy*w - xhat * mean(dy*w * xhat)), xhat = x * s, for one row."""
    C = x.shape[0]
    dot = 0.0
    for c in range(C):
        dot += dy[c] * w[c] * x[c] * s
    dot /= C
    for c in range(C):
        dx[c] += (dy[c] * w[c] - x[c] * s * dot) * s


@njit(parallel=True, cache=True)
def rmsnorm_forward(out, rstd, inp, weight, eps):
    """out (N, C) = inp * rstd * weight; rstd (N,) saved for the backward."""
    for n in prange(inp.shape[0]):
        rstd[n] = _row_forward(out[n], inp[n], weight, eps)


@njit(parallel=True, cache=True)
def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd):
    """Accumulate input and weight grads (dweight empty: frozen, skipped). The weight grad
    sums over rows in a second pass where each task owns a block of columns: no races,
    order independent of threads."""
    N, C = inp.shape
    for n in prange(N):
        _row_backward(dinp[n], dout[n], inp[n], weight, rstd[n])
    if dweight.shape[0] == 0:
        return
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        c1 = min(c0 + COL_BLOCK, C)
        for n in range(N):
            s = rstd[n]
            for c in range(c0, c1):
                dweight[c] += dout[n, c] * inp[n, c] * s


@njit(parallel=True, cache=True)
def qk_norm_forward(out, rstd, qkv, q_weight, k_weight, NH, NKV, eps):
    """out (B, T, W) = qkv with each q head (q_weight) and k head (k_weight) RMS-normalised
    and v copied; rstd (B, T, NH + NKV) saved."""
    B, T, W = qkv.shape
    hs = q_weight.shape[0]
    v_off = (NH + NKV) * hs
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        for h in range(NH + NKV):
            w = q_weight if h < NH else k_weight
            rstd[b, t, h] = _row_forward(out[b, t, h * hs:(h + 1) * hs], qkv[b, t, h * hs:(h + 1) * hs], w, eps)
        out[b, t, v_off:] = qkv[b, t, v_off:]


@njit(cache=True)
def _head_weight_grad(dw, c, dout, qkv, rstd, h0, h1):
    """dw[c] += sum over positions and heads h0..h1-1 of dout * qkv * rstd at column c."""
    B, T, _ = qkv.shape
    hs = dw.shape[0]
    acc = 0.0
    for b in range(B):
        for t in range(T):
            for h in range(h0, h1):
                acc += dout[b, t, h * hs + c] * qkv[b, t, h * hs + c] * rstd[b, t, h]
    dw[c] += acc


@njit(parallel=True, cache=True)
def qk_norm_backward(dqkv, dq_weight, dk_weight, dout, qkv, q_weight, k_weight, rstd, NH, NKV):
    """Accumulate dqkv (normalised heads and the passed-through v) and both weight grads
    (an empty one is frozen: skipped). Weight grads: one task per (weight, column),
    summing over every row and head."""
    B, T, W = qkv.shape
    hs = q_weight.shape[0]
    v_off = (NH + NKV) * hs
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        for h in range(NH + NKV):
            w = q_weight if h < NH else k_weight
            _row_backward(dqkv[b, t, h * hs:(h + 1) * hs], dout[b, t, h * hs:(h + 1) * hs],
                          qkv[b, t, h * hs:(h + 1) * hs], w, rstd[b, t, h])
        for c in range(v_off, W):
            dqkv[b, t, c] += dout[b, t, c]
    for col in prange(2 * hs):  # columns of q_weight, then of k_weight
        if (dq_weight if col < hs else dk_weight).shape[0] == 0:
            continue
        _head_weight_grad(dq_weight if col < hs else dk_weight, col % hs, dout, qkv, rstd,
                          NH if col >= hs else 0, NH + NKV if col >= hs else NH)

