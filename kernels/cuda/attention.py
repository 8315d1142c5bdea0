"""Self-attention over a fused qkv buffer, grouped-query aware, causal or bidirectional
(see the CPU twin).

qkv is (B, T, (NH + 2*NKV) * hs); query head h reads key/value head h // (NH // NKV);
window > 0 limits each query to the last `window` keys. With q0 > 0 only positions
q0..T-1 are queries (the rows before are a KV cache); out and lse hold those T - q0 rows.
causal=False: every query sees every key 0..T-1 (no window then; nt.ops refuses one).

Tiled, flash-attention style: a thread block takes THREADS consecutive rows of one head,
one row per thread, and walks the keys its rows can see in tiles of KEY_TILE rows that
the block loads into shared memory together, so each key and value row is read from
global memory once per block instead of once per query. Each thread runs an online
softmax over its row with the row's accumulators in local memory, and saves the row's
log-sum-exp (the quantity the CPU twin saves too). No T x T matrix exists anywhere.

The backward is two passes so every grad element has a single writer, without atomics:
query rows accumulate dq over tiles of keys and values; key rows accumulate dk and dv over
tiles of the queries (of every head in their group) that see them. Both recompute the
probabilities from the lse. Shared tiles and accumulators are float64, so float64 runs
match the CPU to rounding; head sizes up to HS_MAX.
"""
import math

import numpy as np
from numba import cuda

from .launch import SIMULATOR, THREADS, blocks

HS_MAX = 256                           # largest head size (Gemma 3 uses 256)
KEY_TILE = 4 if SIMULATOR else 8       # rows per shared tile: 2 x 8 x 256 float64 = 32 KB


@cuda.jit(device=True, cache=True)
def _dot(a, tile, r, hs):
    """a[:hs] . tile[r, :hs]."""
    s = 0.0
    for c in range(hs):
        s += a[c] * tile[r, c]
    return s


@cuda.jit(device=True, cache=True)
def _load_rows(dst, src, b, row0, n, col, hs):
    """The block copies src[b, row0:row0+n, col:col+hs] into dst[:n, :hs]."""
    for e in range(cuda.threadIdx.x, n * hs, cuda.blockDim.x):
        dst[e // hs, e % hs] = src[b, row0 + e // hs, col + e % hs]


@cuda.jit(device=True, cache=True)
def _query_rows(task, n_qblk, NH, NKV, hs, T, window, q0):
    """Task -> (batch, head, the block's first and last query positions, this thread's
    query position t, the head's q / k / v columns, t's first visible key)."""
    rows = cuda.blockDim.x
    b = task // (NH * n_qblk)
    h = task // n_qblk % NH
    first = q0 + task % n_qblk * rows
    last = min(T, first + rows) - 1
    t = first + cuda.threadIdx.x
    ko = (NH + h // (NH // NKV)) * hs
    jmin = max(0, t - window + 1) if window > 0 else 0
    return b, h, first, last, t, h * hs, ko, ko + NKV * hs, jmin


@cuda.jit(cache=True)
def _attention_forward(out, lse, qkv, NH, NKV, window, q0, causal):
    B, T, _ = qkv.shape
    Tq = T - q0
    hs = out.shape[2] // NH
    scale = 1.0 / math.sqrt(hs)
    ks = cuda.shared.array((KEY_TILE, HS_MAX), np.float64)
    vs = cuda.shared.array((KEY_TILE, HS_MAX), np.float64)
    q = cuda.local.array(HS_MAX, np.float64)
    acc = cuda.local.array(HS_MAX, np.float64)
    rows = cuda.blockDim.x
    n_qblk = (Tq + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NH * n_qblk, cuda.gridDim.x):
        b, h, first, last, t, qo, ko, vo, jmin = _query_rows(task, n_qblk, NH, NKV, hs, T, window, q0)
        live = t <= last
        m = -math.inf
        l = 0.0
        if live:
            for c in range(hs):
                q[c] = qkv[b, t, qo + c] * scale
                acc[c] = 0.0
        j_lo = max(0, first - window + 1) if window > 0 else 0
        j_end = last + 1 if causal else T   # one past the block's last visible key
        for j0 in range(j_lo, j_end, KEY_TILE):
            n = min(KEY_TILE, j_end - j0)
            _load_rows(ks, qkv, b, j0, n, ko, hs)
            _load_rows(vs, qkv, b, j0, n, vo, hs)
            cuda.syncthreads()
            if live:
                for r in range(n):
                    if j0 + r < jmin or (causal and j0 + r > t):
                        continue
                    s = _dot(q, ks, r, hs)
                    if s > m:  # new running max: rescale what was accumulated so far
                        correction = math.exp(m - s)
                        l *= correction
                        for c in range(hs):
                            acc[c] *= correction
                        m = s
                    p = math.exp(s - m)
                    l += p
                    for c in range(hs):
                        acc[c] += p * vs[r, c]
            cuda.syncthreads()  # the tile is read by everyone before the next load
        if live:
            for c in range(hs):
                out[b, t - q0, qo + c] = acc[c] / l
            lse[b, h, t - q0] = m + math.log(l)


@cuda.jit(cache=True)
def _attention_backward_q(dqkv, dout, qkv, out, lse, NH, NKV, window, q0, causal):
    """dq: one query row per thread, over shared tiles of its keys and values."""
    B, T, _ = qkv.shape
    Tq = T - q0
    hs = out.shape[2] // NH
    scale = 1.0 / math.sqrt(hs)
    ks = cuda.shared.array((KEY_TILE, HS_MAX), np.float64)
    vs = cuda.shared.array((KEY_TILE, HS_MAX), np.float64)
    q = cuda.local.array(HS_MAX, np.float64)
    do = cuda.local.array(HS_MAX, np.float64)
    dq = cuda.local.array(HS_MAX, np.float64)
    rows = cuda.blockDim.x
    n_qblk = (Tq + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NH * n_qblk, cuda.gridDim.x):
        b, h, first, last, t, qo, ko, vo, jmin = _query_rows(task, n_qblk, NH, NKV, hs, T, window, q0)
        live = t <= last
        D = 0.0  # sum_j p_j dp_j = do . o, the softmax backward's shared term
        L = 0.0
        if live:
            for c in range(hs):
                q[c] = qkv[b, t, qo + c] * scale
                do[c] = dout[b, t - q0, qo + c]
                dq[c] = 0.0
                D += do[c] * out[b, t - q0, qo + c]
            L = lse[b, h, t - q0]
        j_lo = max(0, first - window + 1) if window > 0 else 0
        j_end = last + 1 if causal else T
        for j0 in range(j_lo, j_end, KEY_TILE):
            n = min(KEY_TILE, j_end - j0)
            _load_rows(ks, qkv, b, j0, n, ko, hs)
            _load_rows(vs, qkv, b, j0, n, vo, hs)
            cuda.syncthreads()
            if live:
                for r in range(n):
                    if j0 + r < jmin or (causal and j0 + r > t):
                        continue
                    p = math.exp(_dot(q, ks, r, hs) - L)
                    ds = p * (_dot(do, vs, r, hs) - D) * scale
                    for c in range(hs):
                        dq[c] += ds * ks[r, c]
            cuda.syncthreads()
        if live:
            for c in range(hs):
                dqkv[b, t, qo + c] += dq[c]


@cuda.jit(cache=True)
def _attention_backward_kv(dqkv, dout, qkv, out, lse, NH, NKV, window, q0, causal):
    """dk and dv: one key row (b, kv head, j) per thread, over shared tiles of the query
    rows (of every head in the group) that see it."""
    B, T, _ = qkv.shape
    hs = out.shape[2] // NH
    group = NH // NKV
    scale = 1.0 / math.sqrt(hs)
    qs = cuda.shared.array((KEY_TILE, HS_MAX), np.float64)
    dos = cuda.shared.array((KEY_TILE, HS_MAX), np.float64)
    Ls = cuda.shared.array(KEY_TILE, np.float64)
    Ds = cuda.shared.array(KEY_TILE, np.float64)
    k = cuda.local.array(HS_MAX, np.float64)
    v = cuda.local.array(HS_MAX, np.float64)
    dk = cuda.local.array(HS_MAX, np.float64)
    dv = cuda.local.array(HS_MAX, np.float64)
    rows = cuda.blockDim.x
    n_kblk = (T + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NKV * n_kblk, cuda.gridDim.x):
        b = task // (NKV * n_kblk)
        kv = task // n_kblk % NKV
        first = task % n_kblk * rows           # the block's first key position
        last = min(T, first + rows) - 1
        j = first + cuda.threadIdx.x
        live = j <= last
        ko = (NH + kv) * hs
        vo = ko + NKV * hs
        if live:
            for c in range(hs):
                k[c] = qkv[b, j, ko + c] * scale
                v[c] = qkv[b, j, vo + c]
                dk[c] = 0.0
                dv[c] = 0.0
        t_lo = max(first, q0) if causal else q0  # queries t_lo..t_hi see some key of the block
        t_hi = min(T, last + window) - 1 if window > 0 else T - 1
        for h in range(kv * group, (kv + 1) * group):
            qo = h * hs
            for t0 in range(t_lo, t_hi + 1, KEY_TILE):
                n = min(KEY_TILE, t_hi + 1 - t0)
                _load_rows(qs, qkv, b, t0, n, qo, hs)
                _load_rows(dos, dout, b, t0 - q0, n, qo, hs)
                r = cuda.threadIdx.x
                if r < n:  # each row's lse and D = do . o, once per tile
                    Ls[r] = lse[b, h, t0 + r - q0]
                    D = 0.0
                    for c in range(hs):
                        D += dout[b, t0 + r - q0, qo + c] * out[b, t0 + r - q0, qo + c]
                    Ds[r] = D
                cuda.syncthreads()
                if live:
                    for r in range(n):
                        t = t0 + r
                        if (causal and t < j) or (window > 0 and t >= j + window):
                            continue
                        p = math.exp(_dot(k, qs, r, hs) - Ls[r])
                        ds = p * (_dot(v, dos, r, hs) - Ds[r])
                        for c in range(hs):
                            dk[c] += ds * qs[r, c]
                            dv[c] += p * dos[r, c]
                cuda.syncthreads()
        if live:
            for c in range(hs):
                dqkv[b, j, ko + c] += dk[c] * scale
                dqkv[b, j, vo + c] += dv[c]


def attention_work_shape(T):
    """No scratch in global memory: tiles live in shared memory, accumulators per thread."""
    return (0, 0)


def _check_head_size(out, NH):
    if out.shape[2] // NH > HS_MAX:
        raise ValueError(f"CUDA attention supports head sizes up to {HS_MAX}, got {out.shape[2] // NH}")


def attention_forward(out, lse, qkv, work, NH, NKV, window, q0, causal=True):
    """out (B, T-q0, NH*hs) = softmax(q k^T / sqrt(hs), causal mask if causal) v; lse (B, NH, T-q0).
    work: attention_work_shape(T) (empty here)."""
    _check_head_size(out, NH)
    B, T, _ = qkv.shape
    _attention_forward[blocks(B * NH * (T - q0)), THREADS](out, lse, qkv, NH, NKV, window, q0, bool(causal))


def attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, window, q0, causal=True):
    """Accumulate dqkv from dout (two passes: dq, then dk and dv)."""
    _check_head_size(out, NH)
    B, T, _ = qkv.shape
    args = (dqkv, dout, qkv, out, lse, NH, NKV, window, q0, bool(causal))
    _attention_backward_q[blocks(B * NH * (T - q0)), THREADS](*args)
    _attention_backward_kv[blocks(B * NKV * T), THREADS](*args)
