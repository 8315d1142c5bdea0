"""Self-attention over a fused qkv buffer, grouped-query aware; causal or bidirectional.

qkv is (B, T, (NH + 2*NKV) * hs): NH query heads, then NKV key heads, then NKV value
heads. Query head h reads key/value head h // (NH // NKV): NKV == NH is multi-head
attention, NKV == 1 multi-query. window > 0 limits each query to the last `window` keys.

With q0 > 0 only the last T - q0 rows are queries (positions q0..T-1), attending keys
0..T-1: the rows before q0 are a KV cache whose q part is unused. out and lse then hold
the T - q0 query rows. q0 = 0 is ordinary causal self-attention. causal=False lets every
query see every key 0..T-1 (a vision transformer's bidirectional attention); nt.ops
refuses a window then, so the kernels never combine the two.

The work is cut into blocks: up to QBLOCK query positions of G query heads that share one
kv head (G = NH // NKV when the scratch holds them), so grouped-query attention reads each
key and value block once per group, in products G times taller (SmolLM2's 3 heads a
group: 10-12% faster than head by head). A group's query rows are gathered into the
worker's scratch, head after head (one head, G = 1, is used in place); the block's scores
against every key its positions can see are one BLAS call (G*QBLOCK x keys x hs), the
softmax runs on those rows in place, and a second BLAS call multiplies them by the
values. Blocks keep the causal waste small (a block computes the scores right of its
diagonal and zeroes them) and the scratch at a few hundred rows of T per worker: no
T x T matrix is stored. The forward saves only each row's log-sum-exp; the backward
recomputes the probabilities from it, again a block at a time, held transposed (keys x
query rows: the shapes OpenBLAS runs faster there, see _backward_task).

BLAS is called from inside the parallel loop, each call a small matrix product on its
worker's core: OpenBLAS is held to one thread meanwhile (its own thread pool, woken for
every small call from two workers at once, made the kernel 2x to 50x slower). The parallel
kernels only deal tasks to workers; a task is a plain @njit function: inlined into the
parallel loop, the same code took Numba's parfor passes 1.5x as long to compile.
"""
import numba
import numpy as np
from numba import njit, prange

from . import vmath
from .blas import blas_get_threads, blas_set_threads, gemm
from .vmath import like

FASTMATH = {"reassoc", "contract"}
QBLOCK = 64        # query positions per block: big enough for BLAS, small enough to waste little
MAX_ROWS = 256     # query rows (positions x heads) per block; taller gemms gain little more
SCORE_BUDGET = 1 << 18  # score entries per worker (rows x T) before long sequences get fewer rows
HS = 64            # the head size the scratch is sized for (a larger one gets fewer rows)


def attention_work_shape(T: int) -> tuple:
    """The `work` array the attention kernels need: one row per worker thread, holding a
    block's two score matrices (rows x T), two gathered matrices (rows x HS: the queries,
    and the output or its grad) and one number per row."""
    rows = max(QBLOCK, min(MAX_ROWS, SCORE_BUDGET // T))
    return (numba.get_num_threads(), rows * (2 * T + 2 * HS + 1))


@njit(inline="always")
def _block_shape(T, q0, hs, group, L):
    """(G, P): query heads and positions per block that a worker's L scratch numbers hold
    (rows of 2*T scores, one number and 2*hs gathered values)."""
    rows = L // (2 * T + 2 * hs + 1)
    if rows < 1:
        raise ValueError("attention: work is too small (use attention_work_shape(T))")
    P = min(QBLOCK, T - q0, rows)
    G = min(group, rows // P)
    return G, P


@njit(inline="always")
def _block_rows(blk, P, q0, T, window, causal):
    """Block blk's first and one-past-last query positions, its first visible key and
    one past its last (the block's last row when causal, else the last key)."""
    r0 = q0 + blk * P
    r1 = min(T, r0 + P)
    k0 = max(0, r0 - window + 1) if window > 0 else 0
    return r0, r1, k0, r1 if causal else T


@njit(inline="always")
def _visible(t, k0, window, causal, k1):
    """Columns [lo, hi) of a block's score row that query position t may attend."""
    lo = max(0, t - window + 1) - k0 if window > 0 else 0
    return lo, (t + 1 if causal else k1) - k0


@njit(inline="always")
def _at(a, ld, row, col):
    """A flat array from element (row, col) of the matrix with row stride ld it holds:
    how gemm and _copy take a matrix (its first element and its row stride)."""
    return a[row * ld + col:]


@njit(cache=True)
def _copy(dst, ldd, src, lds, rows, cols):
    """dst = src for two (rows, cols) blocks given as flat arrays from their first element
    with row strides ldd and lds. A function of its own, one loop over 1-D C slices: an
    inlined copy at every call site (or Numba's array assignment, which drags in its
    broadcasting and error-message code) cost seconds of compile."""
    for i in range(rows):
        d, s = dst[i * ldd:i * ldd + cols], src[i * lds:i * lds + cols]
        for c in range(cols):
            d[c] = s[c]


# The tasks take qkv, out and their grads flat (fewer array types and index computations
# to compile): qkv's row of (b, t) is b*T + t, out's is b*(T - q0) + t - q0.

@njit(cache=True, fastmath=FASTMATH)
def _forward_task(out, lse, qkv, ws, b, kv, h0, G, r0, r1, k0, k1, T, hs, NH, NKV, window, q0, causal):
    """Heads h0..h0+G-1 (sharing kv head kv) at positions r0..r1-1 of batch row b."""
    width, ow = (NH + 2 * NKV) * hs, NH * hs
    x, o = b * T, b * (T - q0) - q0  # qkv's and out's row of position 0
    M, N = r1 - r0, k1 - k0
    R = G * M
    scale = like(qkv[0], 1.0 / np.sqrt(hs))
    zero, one = like(scale, 0.0), like(scale, 1.0)
    S = ws[:R * N]
    # one head (G = 1) is read and written in place; a group is gathered into scratch,
    # head after head: row g*M + i is head h0+g at position r0+i
    Q, O = _at(qkv, width, x + r0, h0 * hs), _at(out, ow, o + r0, h0 * hs)
    ldq, ldo = width, ow
    if G > 1:
        Q, O = ws[R * N:R * (N + hs)], ws[R * (N + hs):R * (N + 2 * hs)]
        ldq, ldo = hs, hs
        for g in range(G):
            _copy(Q[g * M * hs:], hs, _at(qkv, width, x + r0, (h0 + g) * hs), width, M, hs)
    kc = (NH + kv) * hs
    gemm(False, True, R, N, hs, scale, Q, ldq, _at(qkv, width, x + k0, kc), width, zero, S, N)
    for row in range(R):
        g, i = row // M, row % M
        lo, hi = _visible(r0 + i, k0, window, causal, k1)
        s = S[row * N:(row + 1) * N]
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
        s[hi:] = zero
        lse[b, h0 + g, r0 + i - q0] = m + np.log(l)
    gemm(False, False, R, hs, N, one, S, N, _at(qkv, width, x + k0, kc + NKV * hs), width, zero, O, ldo)
    if G > 1:
        for g in range(G):
            _copy(_at(out, ow, o + r0, (h0 + g) * hs), ow, O[g * M * hs:], hs, M, hs)


@njit(parallel=True, cache=True)
def attention_forward(out, lse, qkv, work, NH, NKV, window, q0, causal=True):
    """out (B, T-q0, NH*hs) = softmax(q k^T / sqrt(hs), causal mask if causal) v; lse (B, NH, T-q0).

    work: attention_work_shape(T), any contents (it is scratch)."""
    B, T = qkv.shape[0], qkv.shape[1]
    hs, group = out.shape[2] // NH, NH // NKV
    G, P = _block_shape(T, q0, hs, group, work.shape[1])
    chunks = (group + G - 1) // G       # blocks of G heads per kv head
    heads = NKV * chunks
    nblk = (T - q0 + P - 1) // P
    x, o = qkv.reshape(qkv.size), out.reshape(out.size)
    W = work.shape[0]
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for w in prange(W):
        # block index varies slowest, so every worker gets a share of the big late blocks
        for task in range(w, nblk * B * heads, W):
            blk, b, c = task // (B * heads), (task // heads) % B, task % heads
            kv = c // chunks
            h0 = kv * group + (c % chunks) * G
            r0, r1, k0, k1 = _block_rows(blk, P, q0, T, window, causal)
            _forward_task(o, lse, x, work[w], b, kv, h0, min(G, (kv + 1) * group - h0),
                          r0, r1, k0, k1, T, hs, NH, NKV, window, q0, causal)
    blas_set_threads(blas_threads)


@njit(cache=True, fastmath=FASTMATH)
def _backward_task(dqkv, dout, qkv, out, lse, ws, b, kv, h0, G, r0, r1, k0, k1, T, hs, NH, NKV, window, q0, causal):
    """Add heads h0..h0+G-1's grads at query positions r0..r1-1 of batch row b into dqkv.

    The probabilities and their grads are held transposed, keys x query rows (N x R):
    single-threaded OpenBLAS runs the products that make them (K Q^T and V dO^T, N x R)
    up to 20% faster than Q K^T (R x N) when R is one head's 64 rows, and the key and value
    grads' (dS^T Q, P^T dO, now with no transposed operand) ~10% faster; the query grads'
    product (dS K, now transposed) ~10% slower, so a group's runs as one R-row product.
    Net, against the row-major layout: one head a block (MHA) -4%, grouped heads level."""
    width, ow = (NH + 2 * NKV) * hs, NH * hs
    x, o = b * T, b * (T - q0) - q0
    M, N = r1 - r0, k1 - k0
    R = G * M
    scale = like(qkv[0], 1.0 / np.sqrt(hs))
    zero, one = like(scale, 0.0), like(scale, 1.0)
    P, dS, D = ws[:N * R], ws[N * R:2 * N * R], ws[2 * N * R:R * (2 * N + 1)]
    # one head in place, a group gathered into scratch (as in the forward)
    Q, dO = _at(qkv, width, x + r0, h0 * hs), _at(dout, ow, o + r0, h0 * hs)
    ldq, ldo = width, ow
    if G > 1:
        base = R * (2 * N + 1)
        Q, dO = ws[base:base + R * hs], ws[base + R * hs:base + 2 * R * hs]
        ldq, ldo = hs, hs
        for g in range(G):
            _copy(Q[g * M * hs:], hs, _at(qkv, width, x + r0, (h0 + g) * hs), width, M, hs)
            _copy(dO[g * M * hs:], hs, _at(dout, ow, o + r0, (h0 + g) * hs), ow, M, hs)
    for row in range(R):
        # D = sum_j p_j dp_j = do . o, the softmax backward's shared term
        start = (o + r0 + row % M) * ow + (h0 + row // M) * hs
        do_, o_ = dout[start:start + hs], out[start:start + hs]
        d = zero
        for c in range(hs):
            d += do_[c] * o_[c]
        D[row] = d
    K, V = _at(qkv, width, x + k0, (NH + kv) * hs), _at(qkv, width, x + k0, (NH + NKV + kv) * hs)
    gemm(False, True, N, R, hs, scale, K, width, Q, ldq, zero, P, R)
    gemm(False, True, N, R, hs, one, V, width, dO, ldo, zero, dS, R)
    for j in range(N):
        # key k0+j is seen by the block's positions r0+i for i in [lo, hi)
        lo = max(0, k0 + j - r0) if causal else 0
        hi = max(lo, min(M, k0 + j + window - r0)) if window > 0 else M
        for g in range(G):
            c0, c1 = j * R + g * M, j * R + (g + 1) * M
            p, ds = P[c0:c1], dS[c0:c1]
            # the visible columns as slices of their own, indexed from 0, so the loop
            # vectorizes (over range(lo, hi) Numba's negative-index wraparound kept it scalar)
            l0 = (b * NH + h0 + g) * (T - q0) + r0 - q0
            pv, dsv, Lv, Dv = p[lo:hi], ds[lo:hi], lse[l0 + lo:l0 + hi], D[g * M + lo:g * M + hi]
            for i in range(pv.shape[0]):
                pi = vmath.exp(pv[i] - Lv[i])
                pv[i] = pi
                dsv[i] = pi * (dsv[i] - Dv[i]) * scale
            p[:lo] = zero
            p[hi:] = zero
            ds[:lo] = zero
            ds[hi:] = zero
    gemm(False, False, N, hs, R, one, dS, R, Q, ldq, one, _at(dqkv, width, x + k0, (NH + kv) * hs), width)
    gemm(False, False, N, hs, R, one, P, R, dO, ldo, one, _at(dqkv, width, x + k0, (NH + NKV + kv) * hs), width)
    if G == 1:
        gemm(True, False, M, hs, N, one, dS, R, K, width, one, _at(dqkv, width, x + r0, h0 * hs), width)
    else:  # the group's query grads in one product: gathered into the queries' scratch, added to, put back
        for g in range(G):
            _copy(Q[g * M * hs:], hs, _at(dqkv, width, x + r0, (h0 + g) * hs), width, M, hs)
        gemm(True, False, R, hs, N, one, dS, R, K, width, one, Q, hs)
        for g in range(G):
            _copy(_at(dqkv, width, x + r0, (h0 + g) * hs), width, Q[g * M * hs:], hs, M, hs)


@njit(parallel=True, cache=True)
def attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, window, q0, causal=True):
    """Accumulate dqkv from dout (work as for the forward). Tasks own one (batch, kv head)
    pair, so the key and value grads that several query heads and blocks add into have a
    single writer."""
    B, T = qkv.shape[0], qkv.shape[1]
    hs, group = out.shape[2] // NH, NH // NKV
    G, P = _block_shape(T, q0, hs, group, work.shape[1])
    nblk = (T - q0 + P - 1) // P
    flat = (dqkv.reshape(dqkv.size), dout.reshape(dout.size), qkv.reshape(qkv.size), out.reshape(out.size),
            lse.reshape(lse.size))
    W = work.shape[0]
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for w in prange(W):
        for task in range(w, B * NKV, W):
            b, kv = task // NKV, task % NKV
            for h0 in range(kv * group, (kv + 1) * group, G):
                for blk in range(nblk):
                    r0, r1, k0, k1 = _block_rows(blk, P, q0, T, window, causal)
                    _backward_task(*flat, work[w], b, kv, h0, min(G, (kv + 1) * group - h0),
                                   r0, r1, k0, k1, T, hs, NH, NKV, window, q0, causal)
    blas_set_threads(blas_threads)
