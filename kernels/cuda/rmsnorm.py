"""RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * weight (see the CPU twin).

`rmsnorm_*` normalise (N, C) rows; `qk_norm_*` normalise every q and k head inside a fused
(B, T, (NH + 2*NKV) * hs) qkv tensor (one weight for q heads, one for k heads; v copied).
Both use the same block-per-row device functions; weight grads give each column one
thread that walks all rows (a single writer, no atomics).
"""
import math

import numpy as np
from numba import cuda

from .launch import THREADS, block_sum, blocks


@cuda.jit(device=True, cache=True)
def _row_forward(buf, o, x, w, eps):
    """o = x * rstd * w for one row, by the whole block; returns rstd."""
    C = x.shape[0]
    ss = 0.0
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        ss += x[c] * x[c]
    s = 1.0 / math.sqrt(block_sum(buf, ss) / C + eps)
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        o[c] = x[c] * s * w[c]
    return s


@cuda.jit(device=True, cache=True)
def _row_backward(buf, dx, dy, x, w, s):
    """dx += s * (dy*w - xhat * mean(dy*w * xhat)), xhat = x * s, by the whole block."""
    C = x.shape[0]
    dot = 0.0
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        dot += dy[c] * w[c] * x[c] * s
    dot = block_sum(buf, dot) / C
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        dx[c] += (dy[c] * w[c] - x[c] * s * dot) * s


@cuda.jit(cache=True)
def _rmsnorm_forward(out, rstd, inp, weight, eps):
    buf = cuda.shared.array(THREADS, np.float64)
    for n in range(cuda.blockIdx.x, inp.shape[0], cuda.gridDim.x):
        s = _row_forward(buf, out[n], inp[n], weight, eps)
        if cuda.threadIdx.x == 0:
            rstd[n] = s


@cuda.jit(cache=True)
def _rmsnorm_backward_input(dinp, dout, inp, weight, rstd):
    buf = cuda.shared.array(THREADS, np.float64)
    for n in range(cuda.blockIdx.x, inp.shape[0], cuda.gridDim.x):
        _row_backward(buf, dinp[n], dout[n], inp[n], weight, rstd[n])


@cuda.jit(cache=True)
def _rmsnorm_backward_weight(dweight, dout, inp, rstd):
    N, C = inp.shape
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        acc = 0.0
        for n in range(N):
            acc += dout[n, c] * inp[n, c] * rstd[n]
        dweight[c] += acc


def rmsnorm_forward(out, rstd, inp, weight, eps):
    """out (N, C) = inp * rstd * weight; rstd (N,) saved for the backward."""
    _rmsnorm_forward[blocks(inp.shape[0], 1), THREADS](out, rstd, inp, weight, eps)


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd):
    """Accumulate input and weight grads (dweight empty: frozen, skipped)."""
    _rmsnorm_backward_input[blocks(inp.shape[0], 1), THREADS](dinp, dout, inp, weight, rstd)
    if dweight.shape[0]:
        _rmsnorm_backward_weight[blocks(inp.shape[1]), THREADS](dweight, dout, inp, rstd)


@cuda.jit(cache=True)
def _qk_norm_forward(out, rstd, qkv, q_weight, k_weight, NH, NKV, eps):
    """One block per (b, t, head) row of the NH + NKV normalised heads."""
    buf = cuda.shared.array(THREADS, np.float64)
    B, T, _ = qkv.shape
    hs = q_weight.shape[0]
    H = NH + NKV
    for r in range(cuda.blockIdx.x, B * T * H, cuda.gridDim.x):
        b = r // (T * H)
        t = r // H % T
        h = r % H
        a = h * hs
        w = q_weight if h < NH else k_weight
        s = _row_forward(buf, out[b, t, a:a + hs], qkv[b, t, a:a + hs], w, eps)
        if cuda.threadIdx.x == 0:
            rstd[b, t, h] = s


@cuda.jit(cache=True)
def _qk_norm_backward_input(dqkv, dout, qkv, q_weight, k_weight, rstd, NH, NKV):
    buf = cuda.shared.array(THREADS, np.float64)
    B, T, _ = qkv.shape
    hs = q_weight.shape[0]
    H = NH + NKV
    for r in range(cuda.blockIdx.x, B * T * H, cuda.gridDim.x):
        b = r // (T * H)
        t = r // H % T
        h = r % H
        a = h * hs
        w = q_weight if h < NH else k_weight
        _row_backward(buf, dqkv[b, t, a:a + hs], dout[b, t, a:a + hs], qkv[b, t, a:a + hs], w, rstd[b, t, h])


@cuda.jit(cache=True)
def _qk_norm_weights(dq_weight, dk_weight, dout, qkv, rstd, NH, NKV, hs):
    """One thread per (weight, column): the sum over every position and head it scales.
    An empty weight grad is frozen: its columns are skipped."""
    B, T, _ = qkv.shape
    for col in range(cuda.grid(1), 2 * hs, cuda.gridsize(1)):
        if (dq_weight if col < hs else dk_weight).shape[0] == 0:
            continue
        c = col % hs
        h0 = NH if col >= hs else 0
        h1 = NH + NKV if col >= hs else NH
        acc = 0.0
        for b in range(B):
            for t in range(T):
                for h in range(h0, h1):
                    acc += dout[b, t, h * hs + c] * qkv[b, t, h * hs + c] * rstd[b, t, h]
        if col < hs:
            dq_weight[c] += acc
        else:
            dk_weight[c] += acc


@cuda.jit(cache=True)
def _copy_values(dst, src, v_off, accumulate):
    """dst[..., v_off:] = (or +=) src[..., v_off:]: the v heads pass through."""
    B, T, W = src.shape
    Wv = W - v_off
    for i in range(cuda.grid(1), B * T * Wv, cuda.gridsize(1)):
        b = i // (T * Wv)
        t = i // Wv % T
        c = v_off + i % Wv
        if accumulate:
            dst[b, t, c] += src[b, t, c]
        else:
            dst[b, t, c] = src[b, t, c]


def qk_norm_forward(out, rstd, qkv, q_weight, k_weight, NH, NKV, eps):
    """out = qkv with each q head (q_weight) and k head (k_weight) RMS-normalised, v copied;
    rstd (B, T, NH + NKV) saved."""
    B, T, W = qkv.shape
    v_off = (NH + NKV) * q_weight.shape[0]
    _qk_norm_forward[blocks(B * T * (NH + NKV), 1), THREADS](out, rstd, qkv, q_weight, k_weight, NH, NKV, eps)
    _copy_values[blocks(B * T * (W - v_off)), THREADS](out, qkv, v_off, False)


def qk_norm_backward(dqkv, dq_weight, dk_weight, dout, qkv, q_weight, k_weight, rstd, NH, NKV):
    """Accumulate dqkv (normalised heads and the passed-through v) and both weight grads."""
    B, T, W = qkv.shape
    hs = q_weight.shape[0]
    v_off = (NH + NKV) * hs
    _qk_norm_backward_input[blocks(B * T * (NH + NKV), 1), THREADS](dqkv, dout, qkv, q_weight, k_weight,
                                                                    rstd, NH, NKV)
    _copy_values[blocks(B * T * (W - v_off)), THREADS](dqkv, dout, v_off, True)
    if dq_weight.shape[0] or dk_weight.shape[0]:
        _qk_norm_weights[blocks(2 * hs), THREADS](dq_weight, dk_weight, dout, qkv, rstd, NH, NKV, hs)
