"""RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * weight (see the CPU twin).

`rmsnorm_*` normalise (N, C) rows; `qk_norm_*` normalise every q and k head inside a fused
(B, T, (NH + 2*NKV) * hs) qkv tensor (one weight for q heads, one for k heads; v copied).
Both use the same block-per-row device functions; weight grads are deterministic
two-stage column sums (reduce.py). Math in the input's dtype (literals through `dt`).
"""
import math

from numba import cuda

from . import reduce
from .launch import THREADS, block_sum, blocks, shared_bytes


@cuda.jit(device=True, cache=True)
def _row_forward(buf, o, x, w, eps):
    """o = x * rstd * w for one row, by the whole block; returns rstd."""
    dt = x.dtype.type
    C = x.shape[0]
    ss = dt(0)
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        ss += x[c] * x[c]
    s = dt(1) / math.sqrt(block_sum(buf, ss) / dt(C) + dt(eps))
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        o[c] = x[c] * s * w[c]
    return s


@cuda.jit(device=True, cache=True)
def _row_backward(buf, dx, dy, x, w, s):
    """dx += s * (dy*w - xhat * mean(dy*w * xhat)), xhat = x * s, by the whole block."""
    dt = x.dtype.type
    C = x.shape[0]
    dot = dt(0)
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        dot += dy[c] * w[c] * x[c] * s
    dot = block_sum(buf, dot) / dt(C)
    for c in range(cuda.threadIdx.x, C, cuda.blockDim.x):
        dx[c] += (dy[c] * w[c] - x[c] * s * dot) * s


@cuda.jit(cache=True)
def _rmsnorm_forward(out, rstd, inp, weight, eps):
    buf = cuda.shared.array(0, inp.dtype)
    for n in range(cuda.blockIdx.x, inp.shape[0], cuda.gridDim.x):
        s = _row_forward(buf, out[n], inp[n], weight, eps)
        if cuda.threadIdx.x == 0:
            rstd[n] = s


@cuda.jit(cache=True)
def _rmsnorm_backward_input(dinp, dout, inp, weight, rstd):
    buf = cuda.shared.array(0, inp.dtype)
    for n in range(cuda.blockIdx.x, inp.shape[0], cuda.gridDim.x):
        _row_backward(buf, dinp[n], dout[n], inp[n], weight, rstd[n])


@cuda.jit(cache=True)
def _rmsnorm_weight_partial(partial, dout, inp, rstd, rows_per_chunk):
    """Stage 1 of the weight grad (reduce.py): partial[k, c] = sum of dy * x * rstd over chunk k."""
    N, C = inp.shape
    K = partial.shape[0]
    tiles = (C + cuda.blockDim.x - 1) // cuda.blockDim.x
    for task in range(cuda.blockIdx.x, K * tiles, cuda.gridDim.x):
        k = task // tiles
        c = task % tiles * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            acc = inp.dtype.type(0)
            for n in range(k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk)):
                acc += dout[n, c] * inp[n, c] * rstd[n]
            partial[k, c] = acc


def rmsnorm_forward(out, rstd, inp, weight, eps):
    """out (N, C) = inp * rstd * weight; rstd (N,) saved for the backward."""
    _rmsnorm_forward[blocks(inp.shape[0], 1), THREADS, 0, shared_bytes(inp.dtype)](out, rstd, inp, weight, eps)


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch):
    """Accumulate input and weight grads (dweight empty: frozen, skipped); scratch (N, C)
    holds the weight grad's per-chunk partial sums (at most N chunks)."""
    N, C = inp.shape
    if scratch.shape[0] < N or scratch.shape[1] != C:
        raise ValueError("rmsnorm_backward: scratch must be (N, C)")
    _rmsnorm_backward_input[blocks(N, 1), THREADS, 0, shared_bytes(inp.dtype)](dinp, dout, inp, weight, rstd)
    if dweight.shape[0]:
        n_chunks, rows = reduce.chunks(N)
        partial = scratch[:n_chunks]
        _rmsnorm_weight_partial[reduce.stage1_grid(n_chunks, C), THREADS](partial, dout, inp, rstd, rows)
        reduce.sum_partials(dweight, partial)


@cuda.jit(cache=True)
def _qk_norm_forward(out, rstd, qkv, q_weight, k_weight, NH, NKV, eps):
    """One block per (b, t, head) row of the NH + NKV normalised heads."""
    buf = cuda.shared.array(0, qkv.dtype)
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
    buf = cuda.shared.array(0, qkv.dtype)
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
def _qk_norm_weights_partial(partial, dout, qkv, rstd, NH, NKV, rows_per_chunk):
    """Stage 1 of both weight grads (reduce.py), rows being the B*T positions: column c of
    partial[0, k] sums dy * x * rstd over chunk k's positions and every q head, partial[1, k]
    over the k heads. Columns are the 2 * hs (weight, column) pairs."""
    B, T, _ = qkv.shape
    K = partial.shape[1]
    hs = partial.shape[2]
    tiles = (2 * hs + cuda.blockDim.x - 1) // cuda.blockDim.x
    for task in range(cuda.blockIdx.x, K * tiles, cuda.gridDim.x):
        k = task // tiles
        col = task % tiles * cuda.blockDim.x + cuda.threadIdx.x
        if col < 2 * hs:
            w = col // hs
            c = col % hs
            h0 = NH if w == 1 else 0
            h1 = NH + NKV if w == 1 else NH
            acc = qkv.dtype.type(0)
            for n in range(k * rows_per_chunk, min(B * T, (k + 1) * rows_per_chunk)):
                b = n // T
                t = n % T
                for h in range(h0, h1):
                    acc += dout[b, t, h * hs + c] * qkv[b, t, h * hs + c] * rstd[b, t, h]
            partial[w, k, c] = acc


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
    _qk_norm_forward[blocks(B * T * (NH + NKV), 1), THREADS, 0, shared_bytes(qkv.dtype)](
        out, rstd, qkv, q_weight, k_weight, NH, NKV, eps)
    _copy_values[blocks(B * T * (W - v_off)), THREADS](out, qkv, v_off, False)


def qk_norm_backward(dqkv, dq_weight, dk_weight, dout, qkv, q_weight, k_weight, rstd, NH, NKV):
    """Accumulate dqkv (normalised heads and the passed-through v) and both weight grads."""
    B, T, W = qkv.shape
    hs = q_weight.shape[0]
    v_off = (NH + NKV) * hs
    _qk_norm_backward_input[blocks(B * T * (NH + NKV), 1), THREADS, 0, shared_bytes(qkv.dtype)](
        dqkv, dout, qkv, q_weight, k_weight, rstd, NH, NKV)
    _copy_values[blocks(B * T * (W - v_off)), THREADS](dqkv, dout, v_off, True)
    if dq_weight.shape[0] or dk_weight.shape[0]:
        n_chunks, rows = reduce.chunks(B * T)
        partial = reduce.partials(2, B * T, hs, qkv.dtype)
        _qk_norm_weights_partial[reduce.stage1_grid(n_chunks, 2 * hs), THREADS](partial, dout, qkv, rstd, NH, NKV,
                                                                                rows)
        for dw, part in ((dq_weight, partial[0]), (dk_weight, partial[1])):
            if dw.shape[0]:  # an empty weight grad is frozen
                reduce.sum_partials(dw, part)
