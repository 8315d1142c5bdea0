"""Causal self-attention over a fused qkv buffer, grouped-query aware.

qkv is (B, T, (NH + 2*NKV) * hs): NH query heads, then NKV key heads, then NKV value
heads. Query head h reads key/value head h // (NH // NKV): NKV == NH is multi-head
attention, NKV == 1 multi-query. window > 0 limits each query to the last `window` keys.

With q0 > 0 only the last T - q0 rows are queries (positions q0..T-1), attending keys
0..T-1: the rows before q0 are a KV cache whose q part is unused. out and lse then hold
the T - q0 query rows. q0 = 0 is ordinary causal self-attention.

No T x T matrix is ever stored. The forward runs an online softmax per query row and
saves only the row's log-sum-exp; the backward recomputes each probability from it.

Arithmetic stays in the input's float type (vmath), and `reassoc` lets LLVM vectorize the
head-size dot products; inf and NaN keep their IEEE meaning (no `nnan`/`ninf`).
"""
import numpy as np
from numba import njit, prange

from . import vmath
from .vmath import like

FASTMATH = {"reassoc", "contract"}


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_forward(out, lse, qkv, NH, NKV, window, q0=0):
    """out (B, T-q0, NH*hs) = softmax(q k^T / sqrt(hs), causal) v; lse (B, NH, T-q0)."""
    B, T, _ = qkv.shape
    Tq = T - q0
    hs = out.shape[2] // NH
    group = NH // NKV
    scale = like(qkv[0, 0, 0], 1.0 / np.sqrt(hs))
    zero = like(qkv[0, 0, 0], 0.0)
    k_off = NH * hs
    v_off = (NH + NKV) * hs
    for r in prange(B * NH * Tq):
        b = r // (NH * Tq)
        h = (r // Tq) % NH
        tq = r % Tq
        t = q0 + tq  # the query's position
        kv = h // group
        q = qkv[b, t, h * hs:(h + 1) * hs]
        o = out[b, tq, h * hs:(h + 1) * hs]
        o[:] = zero
        m = like(zero, -np.inf)
        l = zero
        j0 = max(0, t - window + 1) if window > 0 else 0
        for j in range(j0, t + 1):
            k = qkv[b, j, k_off + kv * hs:k_off + (kv + 1) * hs]
            s = zero
            for c in range(hs):
                s += q[c] * k[c]
            s *= scale
            if s > m:  # new running max: rescale what was accumulated so far
                correction = vmath.exp(m - s)
                l *= correction
                for c in range(hs):
                    o[c] *= correction
                m = s
            p = vmath.exp(s - m)
            l += p
            v = qkv[b, j, v_off + kv * hs:v_off + (kv + 1) * hs]
            for c in range(hs):
                o[c] += p * v[c]
        inv = like(zero, 1.0) / l
        for c in range(hs):
            o[c] *= inv
        lse[b, h, tq] = m + np.log(l)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_backward(dqkv, dout, qkv, out, lse, NH, NKV, window, q0=0):
    """Accumulate dqkv from dout. Tasks own one (batch, kv head) pair, so the key and
    value grads that several query heads and rows add into have a single writer."""
    B, T, _ = qkv.shape
    hs = out.shape[2] // NH
    group = NH // NKV
    scale = like(qkv[0, 0, 0], 1.0 / np.sqrt(hs))
    zero = like(qkv[0, 0, 0], 0.0)
    k_off = NH * hs
    v_off = (NH + NKV) * hs
    for u in prange(B * NKV):
        b = u // NKV
        kv = u % NKV
        for h in range(kv * group, (kv + 1) * group):
            for tq in range(T - q0):
                t = q0 + tq
                q = qkv[b, t, h * hs:(h + 1) * hs]
                dq = dqkv[b, t, h * hs:(h + 1) * hs]
                do = dout[b, tq, h * hs:(h + 1) * hs]
                o = out[b, tq, h * hs:(h + 1) * hs]
                # D = sum_j p_j dp_j = do . o, the softmax backward's shared term
                D = zero
                for c in range(hs):
                    D += do[c] * o[c]
                L = lse[b, h, tq]
                j0 = max(0, t - window + 1) if window > 0 else 0
                for j in range(j0, t + 1):
                    k = qkv[b, j, k_off + kv * hs:k_off + (kv + 1) * hs]
                    v = qkv[b, j, v_off + kv * hs:v_off + (kv + 1) * hs]
                    dk = dqkv[b, j, k_off + kv * hs:k_off + (kv + 1) * hs]
                    dv = dqkv[b, j, v_off + kv * hs:v_off + (kv + 1) * hs]
                    s = zero
                    dp = zero
                    for c in range(hs):
                        s += q[c] * k[c]
                        dp += do[c] * v[c]
                    p = vmath.exp(s * scale - L)
                    ds = p * (dp - D) * scale
                    for c in range(hs):
                        dq[c] += ds * k[c]
                        dk[c] += ds * q[c]
                        dv[c] += p * do[c]
