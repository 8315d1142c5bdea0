"""RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * weight.

`rmsnorm_*` normalise (N, C) rows. `qk_norm_*` apply the same row rule to every query
and key head inside a fused (B, T, (NH + 2*NKV) * hs) qkv tensor (Qwen3, Gemma-3): one
weight of size hs shared by all query heads, another by all key heads; values pass
through unchanged. Both share the per-row helpers below, so the maths exists once.

The row sums (mean of squares, the backward's dot) are float64 reductions that LLVM may
reorder (fastmath reassoc): without it each sum is one serial chain of scalar adds, which
was the whole cost of the forward (SmolLM2-135M's 1024 x 576 rows: 0.33 -> 0.11 ms).
"""
import numpy as np
from numba import njit, prange

from .vmath import like

ROW_CHUNK = 16   # rows per task of rmsnorm_backward: its weight-grad partial sums cover these
REDUCE = {"reassoc", "contract"}   # lets the row sums vectorise; no other fast-math license


@njit(cache=True, fastmath=REDUCE)
def _row_forward(o, x, w, eps):
    """o = x * rstd * w for one row; returns rstd."""
    C = x.shape[0]
    ss = 0.0
    for c in range(C):
        ss += x[c] * x[c]
    s = 1.0 / np.sqrt(ss / C + eps)
    st = like(x[0], s)  # the sum in float64, the row's arithmetic in its own type (8 float32 lanes)
    for c in range(C):
        o[c] = x[c] * st * w[c]
    return s


@njit(cache=True, fastmath=REDUCE)
def _row_backward(dx, dw, dy, x, w, s):
    """dx += s * (dy*w - xhat * mean(dy*w * xhat)), xhat = x * s, for one row; and, when dw
    is not empty, dw += dy * xhat (a weight-grad partial sum)."""
    C = x.shape[0]
    dot = 0.0
    for c in range(C):
        dot += dy[c] * w[c] * x[c]
    dot = like(s, dot * s * s / C)  # s is rstd's element: the row's float type
    for c in range(C):
        dx[c] += (dy[c] * w[c] - x[c] * dot) * s
    for c in range(dw.shape[0]):
        dw[c] += dy[c] * x[c] * s


@njit(parallel=True, cache=True)
def rmsnorm_forward(out, rstd, inp, weight, eps):
    """out (N, C) = inp * rstd * weight; rstd (N,) saved for the backward."""
    for n in prange(inp.shape[0]):
        rstd[n] = _row_forward(out[n], inp[n], weight, eps)


@njit(parallel=True, cache=True)
def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch):
    """Accumulate input and weight grads (dweight empty: frozen, skipped) in one pass over
    the rows: each task takes ROW_CHUNK rows and sums their weight-grad terms into its own
    row of scratch (N, C), then a second, small pass adds the ceil(N / ROW_CHUNK) partial
    rows into dweight. No races; the sums' order does not depend on the thread count."""
    N, C = inp.shape
    if scratch.shape[0] < N or scratch.shape[1] != C:
        raise ValueError("rmsnorm_backward: scratch must be (N, C)")
    n_chunks = (N + ROW_CHUNK - 1) // ROW_CHUNK
    width = C if dweight.shape[0] > 0 else 0
    for k in prange(n_chunks):
        dw = scratch[k, :width]
        dw[:] = 0.0
        for n in range(k * ROW_CHUNK, min(N, (k + 1) * ROW_CHUNK)):
            _row_backward(dinp[n], dw, dout[n], inp[n], weight, rstd[n])
    for c in prange(width):
        acc = 0.0
        for k in range(n_chunks):
            acc += scratch[k, c]
        dweight[c] += acc


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
            _row_backward(dqkv[b, t, h * hs:(h + 1) * hs], w[:0], dout[b, t, h * hs:(h + 1) * hs],
                          qkv[b, t, h * hs:(h + 1) * hs], w, rstd[b, t, h])
        for c in range(v_off, W):
            dqkv[b, t, c] += dout[b, t, c]
    for col in prange(2 * hs):  # columns of q_weight, then of k_weight
        if (dq_weight if col < hs else dk_weight).shape[0] == 0:
            continue
        _head_weight_grad(dq_weight if col < hs else dk_weight, col % hs, dout, qkv, rstd,
                          NH if col >= hs else 0, NH + NKV if col >= hs else NH)

