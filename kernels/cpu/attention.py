"""Self-attention over a fused qkv buffer, grouped-query aware; causal or bidirectional.

qkv is (B, T, (NH + 2*NKV) * hs): NH query heads, then NKV key heads, then NKV value
heads. Query head h reads key/value head h // (NH // NKV): NKV == NH is multi-head
attention, NKV == 1 multi-query. window > 0 limits each query to the last `window` keys.

With q0 > 0 only the last T - q0 rows are queries (positions q0..T-1), attending keys
0..T-1: the rows before q0 are a KV cache whose q part is unused. out and lse then hold
the T - q0 query rows. q0 = 0 is ordinary causal self-attention. causal=False lets every
query see every key 0..T-1 (a vision transformer's bidirectional attention); nt.ops
refuses a window then, so the kernels never combine the two.

The work is cut into blocks of QBLOCK query rows of one head. A block's scores against
every key its rows can see are one BLAS call (QBLOCK x keys x hs) into the worker's
slice of `work`; the softmax runs on those rows in place, and a second BLAS call
multiplies them by the values. Blocks keep the causal waste small (a block computes the
scores right of its diagonal and zeroes them) and the scratch at QBLOCK x T per worker:
no T x T matrix is stored. The forward saves only each row's log-sum-exp; the backward
recomputes the probabilities from it, again a block at a time, with five BLAS calls.

BLAS is called from inside the parallel loop, each call a small matrix product on its
worker's core: OpenBLAS is held to one thread meanwhile (its own thread pool, woken for
every small call from two workers at once, made the kernel 2x to 50x slower).
"""
import numba
import numpy as np
from numba import njit, prange

from . import vmath
from .blas import blas_get_threads, blas_set_threads, gemm
from .vmath import like

FASTMATH = {"reassoc", "contract"}
QBLOCK = 64  # query rows per block: big enough for BLAS, small enough to waste little


def attention_work_shape(T: int) -> tuple:
    """The `work` array the attention kernels need: one row per worker thread, holding
    two (QBLOCK, T) score blocks."""
    return (numba.get_num_threads(), 2 * QBLOCK * T)


@njit(inline="always")
def _sizes(qkv, out, NH, NKV, q0):
    """B, T, qkv's row width, head size, query heads per kv head, query blocks."""
    B, T, width = qkv.shape
    return B, T, width, out.shape[2] // NH, NH // NKV, (T - q0 + QBLOCK - 1) // QBLOCK


@njit(inline="always")
def _block(blk, q0, T, window, causal):
    """Block blk's first and one-past-last query positions, its first visible key and
    one past its last (the block's last row when causal, else the last key)."""
    r0 = q0 + blk * QBLOCK
    r1 = min(T, r0 + QBLOCK)
    k0 = max(0, r0 - window + 1) if window > 0 else 0
    return r0, r1, k0, r1 if causal else T


@njit(inline="always")
def _visible(t, k0, window, causal, k1):
    """Columns [lo, hi) of a block's score row that query position t may attend."""
    lo = max(0, t - window + 1) - k0 if window > 0 else 0
    return lo, (t + 1 if causal else k1) - k0


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_forward(out, lse, qkv, work, NH, NKV, window, q0, causal=True):
    """out (B, T-q0, NH*hs) = softmax(q k^T / sqrt(hs), causal mask if causal) v; lse (B, NH, T-q0).

    work: attention_work_shape(T), any contents (it is scratch)."""
    B, T, width, hs, group, nblk = _sizes(qkv, out, NH, NKV, q0)
    scale = like(qkv[0, 0, 0], 1.0 / np.sqrt(hs))
    zero, one = like(scale, 0.0), like(scale, 1.0)
    W = work.shape[0]
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for w in prange(W):
        S = work[w, :QBLOCK * T].reshape((QBLOCK, T))
        # block index varies slowest, so every worker gets a share of the big late blocks
        for task in range(w, nblk * B * NH, W):
            blk = task // (B * NH)
            b = (task // NH) % B
            h = task % NH
            kc = (NH + h // group) * hs   # this head's key columns
            vc = kc + NKV * hs             # and value columns
            r0, r1, k0, k1 = _block(blk, q0, T, window, causal)
            M, N = r1 - r0, k1 - k0
            gemm(False, True, M, N, hs, scale, qkv[b, r0:, h * hs:], width, qkv[b, k0:, kc:], width,
                 zero, S, T)
            for i in range(M):
                lo, hi = _visible(r0 + i, k0, window, causal, k1)
                s = S[i]
                # the visible columns as a slice of their own, indexed from 0, so the loops
                # vectorize (over range(lo, hi) Numba keeps negative-index wraparound: scalar exp)
                sv = s[lo:hi]
                m = sv[0]
                for j in range(1, sv.shape[0]):
                    m = max(m, sv[j])
                l = zero
                for j in range(sv.shape[0]):
                    e = vmath.exp(sv[j] - m)
                    sv[j] = e
                    l += e
                inv = one / l
                for j in range(sv.shape[0]):
                    sv[j] *= inv
                s[:lo] = zero
                s[hi:N] = zero
                lse[b, h, r0 + i - q0] = m + np.log(l)
            gemm(False, False, M, hs, N, one, S, T, qkv[b, k0:, vc:], width,
                 zero, out[b, r0 - q0:, h * hs:], NH * hs)
    blas_set_threads(blas_threads)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, window, q0, causal=True):
    """Accumulate dqkv from dout (work as for the forward). Tasks own one (batch, kv head)
    pair, so the key and value grads that several query heads and blocks add into have a
    single writer."""
    B, T, width, hs, group, nblk = _sizes(qkv, out, NH, NKV, q0)
    scale = like(qkv[0, 0, 0], 1.0 / np.sqrt(hs))
    zero, one = like(scale, 0.0), like(scale, 1.0)
    W = work.shape[0]
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for w in prange(W):
        P = work[w, :QBLOCK * T].reshape((QBLOCK, T))
        dS = work[w, QBLOCK * T:2 * QBLOCK * T].reshape((QBLOCK, T))
        for task in range(w, B * NKV, W):
            b = task // NKV
            kv = task % NKV
            kc = (NH + kv) * hs
            vc = kc + NKV * hs
            for h in range(kv * group, (kv + 1) * group):
                qc = h * hs
                for blk in range(nblk):
                    r0, r1, k0, k1 = _block(blk, q0, T, window, causal)
                    M, N = r1 - r0, k1 - k0
                    q_rows, do_rows = qkv[b, r0:, qc:], dout[b, r0 - q0:, qc:]
                    gemm(False, True, M, N, hs, scale, q_rows, width, qkv[b, k0:, kc:], width, zero, P, T)
                    gemm(False, True, M, N, hs, one, do_rows, NH * hs, qkv[b, k0:, vc:], width, zero, dS, T)
                    for i in range(M):
                        lo, hi = _visible(r0 + i, k0, window, causal, k1)
                        # D = sum_j p_j dp_j = do . o, the softmax backward's shared term
                        do, o = dout[b, r0 + i - q0, qc:qc + hs], out[b, r0 + i - q0, qc:qc + hs]
                        D = zero
                        for c in range(hs):
                            D += do[c] * o[c]
                        L = lse[b, h, r0 + i - q0]
                        p, ds = P[i], dS[i]
                        # the visible columns as slices of their own: counted from 0 the
                        # indices are known non-negative and the loop vectorizes (over
                        # range(lo, hi) Numba's negative-index wraparound kept it scalar)
                        pv, dsv = p[lo:hi], ds[lo:hi]
                        for j in range(pv.shape[0]):
                            pj = vmath.exp(pv[j] - L)
                            pv[j] = pj
                            dsv[j] = pj * (dsv[j] - D) * scale
                        p[:lo] = zero
                        p[hi:N] = zero
                        ds[:lo] = zero
                        ds[hi:N] = zero
                    gemm(False, False, M, hs, N, one, dS, T, qkv[b, k0:, kc:], width,
                         one, dqkv[b, r0:, qc:], width)
                    gemm(True, False, N, hs, M, one, dS, T, q_rows, width, one, dqkv[b, k0:, kc:], width)
                    gemm(True, False, N, hs, M, one, P, T, do_rows, NH * hs, one, dqkv[b, k0:, vc:], width)
    blas_set_threads(blas_threads)
