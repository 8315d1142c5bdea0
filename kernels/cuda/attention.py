"""Causal self-attention over a fused qkv buffer, grouped-query aware (see the CPU twin).

qkv is (B, T, (NH + 2*NKV) * hs); query head h reads key/value head h // (NH // NKV);
window > 0 limits each query to the last `window` keys. With q0 > 0 only positions
q0..T-1 are queries (the rows before are a KV cache); out and lse hold those T - q0 rows.

One thread per query row runs an online softmax over the keys and saves the row's
log-sum-exp, the quantity the CPU twin saves too (it computes blocks of rows with BLAS). The backward is split in two passes so every grad element has a single writer,
without atomics: one thread per query row accumulates dq, one thread per key row
accumulates dk and dv over the queries (of every head in its group) that see it. Both
recompute the probabilities from the lse.
"""
import math

from numba import cuda

from .launch import THREADS, blocks


@cuda.jit(cache=True)
def _attention_forward(out, lse, qkv, NH, NKV, window, q0):
    B, T, _ = qkv.shape
    Tq = T - q0
    hs = out.shape[2] // NH
    group = NH // NKV
    scale = 1.0 / math.sqrt(hs)
    for r in range(cuda.grid(1), B * NH * Tq, cuda.gridsize(1)):
        b = r // (NH * Tq)
        h = r // Tq % NH
        tq = r % Tq
        t = q0 + tq                          # the query's position
        qo = h * hs                          # offsets of this row's q, k, v and out
        ko = NH * hs + h // group * hs
        vo = (NH + NKV) * hs + h // group * hs
        for c in range(hs):
            out[b, tq, qo + c] = 0.0
        m = -math.inf
        l = 0.0
        j0 = max(0, t - window + 1) if window > 0 else 0
        for j in range(j0, t + 1):
            s = 0.0
            for c in range(hs):
                s += qkv[b, t, qo + c] * qkv[b, j, ko + c]
            s *= scale
            if s > m:  # new running max: rescale what was accumulated so far
                correction = math.exp(m - s)
                l *= correction
                for c in range(hs):
                    out[b, tq, qo + c] *= correction
                m = s
            p = math.exp(s - m)
            l += p
            for c in range(hs):
                out[b, tq, qo + c] += p * qkv[b, j, vo + c]
        inv = 1.0 / l
        for c in range(hs):
            out[b, tq, qo + c] *= inv
        lse[b, h, tq] = m + math.log(l)


@cuda.jit(device=True, cache=True)
def _score_grads(dout, qkv, out, lse, b, h, t, tq, j, hs, qo, ko, vo, scale):
    """For query (b, h, position t = row tq) and key j: the probability p and score grad ds."""
    s = 0.0
    dp = 0.0
    D = 0.0  # sum_j p_j dp_j = do . o, the softmax backward's shared term
    for c in range(hs):
        s += qkv[b, t, qo + c] * qkv[b, j, ko + c]
        dp += dout[b, tq, qo + c] * qkv[b, j, vo + c]
        D += dout[b, tq, qo + c] * out[b, tq, qo + c]
    p = math.exp(s * scale - lse[b, h, tq])
    return p, p * (dp - D) * scale


@cuda.jit(cache=True)
def _attention_backward_q(dqkv, dout, qkv, out, lse, NH, NKV, window, q0):
    """dq for one query row per thread."""
    B, T, _ = qkv.shape
    Tq = T - q0
    hs = out.shape[2] // NH
    group = NH // NKV
    scale = 1.0 / math.sqrt(hs)
    for r in range(cuda.grid(1), B * NH * Tq, cuda.gridsize(1)):
        b = r // (NH * Tq)
        h = r // Tq % NH
        tq = r % Tq
        t = q0 + tq
        qo = h * hs
        ko = NH * hs + h // group * hs
        vo = (NH + NKV) * hs + h // group * hs
        j0 = max(0, t - window + 1) if window > 0 else 0
        for j in range(j0, t + 1):
            p, ds = _score_grads(dout, qkv, out, lse, b, h, t, tq, j, hs, qo, ko, vo, scale)
            for c in range(hs):
                dqkv[b, t, qo + c] += ds * qkv[b, j, ko + c]


@cuda.jit(cache=True)
def _attention_backward_kv(dqkv, dout, qkv, out, lse, NH, NKV, window, q0):
    """dk and dv for one key row (b, kv head, j) per thread, over all queries seeing it."""
    B, T, _ = qkv.shape
    hs = out.shape[2] // NH
    group = NH // NKV
    scale = 1.0 / math.sqrt(hs)
    for r in range(cuda.grid(1), B * NKV * T, cuda.gridsize(1)):
        b = r // (NKV * T)
        kv = r // T % NKV
        j = r % T
        ko = NH * hs + kv * hs
        vo = (NH + NKV) * hs + kv * hs
        t0 = max(j, q0)                               # queries t0..t1-1 see key j
        t1 = min(T, j + window) if window > 0 else T
        for h in range(kv * group, (kv + 1) * group):
            qo = h * hs
            for t in range(t0, t1):
                p, ds = _score_grads(dout, qkv, out, lse, b, h, t, t - q0, j, hs, qo, ko, vo, scale)
                for c in range(hs):
                    dqkv[b, j, ko + c] += ds * qkv[b, t, qo + c]
                    dqkv[b, j, vo + c] += p * dout[b, t - q0, qo + c]


def attention_work_shape(T):
    """No scratch: each thread keeps its query row's running sums in registers."""
    return (0, 0)


def attention_forward(out, lse, qkv, work, NH, NKV, window, q0):
    """out (B, T-q0, NH*hs) = softmax(q k^T / sqrt(hs), causal) v; lse (B, NH, T-q0).
    work: attention_work_shape(T) (empty here)."""
    B, T, _ = qkv.shape
    _attention_forward[blocks(B * NH * (T - q0)), THREADS](out, lse, qkv, NH, NKV, window, q0)


def attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, window, q0):
    """Accumulate dqkv from dout (two passes: dq, then dk and dv)."""
    B, T, _ = qkv.shape
    _attention_backward_q[blocks(B * NH * (T - q0)), THREADS](dqkv, dout, qkv, out, lse, NH, NKV, window, q0)
    _attention_backward_kv[blocks(B * NKV * T), THREADS](dqkv, dout, qkv, out, lse, NH, NKV, window, q0)
