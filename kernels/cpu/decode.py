"""One decoding step of a Llama-family model (B = 1, T = 1) in one parallel region.

The tape path runs ~15 ops per layer, each a Python call and a parallel region; at 58M
parameters a token is ~1 ms of arithmetic, so that overhead and thread start-up dominated
(and 2 threads ran slower than 1). Here one call does the whole token, as phases in order,
per layer

    QKV_ATT  rmsnorm -> [quantise x] -> per kv head: its q, k, v rows, RoPE, KV-cache append,
             attention of its q heads
             (or, when the thread count does not divide the kv heads: QKV, per head its
             rows, RoPE, cache append; then ATT, per q head its attention)
    OUT      [quantise] -> out rows, added into the residual in place
    GATE_UP  rmsnorm -> [quantise] -> gate_i, up_i rows -> silu(gate_i) * up_i
    DOWN     [quantise] -> down rows, added into the residual

then HEAD, the final norm and the classifier rows. A phase's work is cut into at most
nthreads contiguous units. The threads of one parallel region (`_token`) claim units from
one counter and meet at the phase boundaries on a done counter (kernels/cpu/sync.py)
instead of opening a region a phase (a fork/join costs ~2.3 us on 2 threads here, and
SmolLM2-135M had 151 a token). Each thread computes a phase's input (norm, quantised
activation) itself into its own scratch, so nothing runs on one thread while the others
wait. Each weight byte is read once per token. A matrix is float32 (code -1: `wf`, rows
dotted in float32 with reassociation so they vectorise) or ggml blocks (code >= 0, see
quant.QDOT_CODES: `wq`, integer dots against the activation quantised once per phase),
four rows per call where the rows allow (quant.qdot: one pass over the activation serves
four weight rows), or BitNet's packed ternary T2 rows (bitnet.T2_CODE: bitnet.t2dot
against the activation quantised per token; a BitNet model's sub-norms run before the out
and down rows). A new weight code slots in at _quantize_for, _row and _rows4. Every
matrix's rows go through the one _rows_into call in _token, inside the parallel region's
body (Numba compiles that with its arrays marked not aliasing: the same loop in a function
called from it ran the classifier's rows 6-40% slower), and one inlined copy of the row
dots instead of one a region cut the step's cold compile from 34 to 25 s. No BLAS is called, so no second thread pool competes with Numba's.

Numba's cache keys these kernels on this file alone, with quant's globals (QDOT_BLOCK, the
qdot dispatch) and its intrinsics' code compiled in: a new code in quant.QDOT_CODES (Q5_0 = 4
was the last) or a change to the row dots' code (the last: the K-quants' scales
as vectors) must come with an edit here, or a stale cache runs the old code (seen: IndexError
on code 4).
"""
import numpy as np
from numba import njit, prange

from .bitnet import T2_CODE, quantize_row_t2, t2dot
from .quant import QDOT_BLOCK, QK, qdot, _quantize_row_q8
from .rmsnorm import _row_forward as _rmsnorm_row
from .rope import _rotate_row
from .sync import LINE, fetch_add, wait_at_least


@njit(cache=True, fastmath=True)
def _fdot(w, x):
    s = np.float32(0.0)
    for c in range(x.shape[0]):
        s += w[c] * x[c]
    return s


@njit(cache=True)
def _quantize_for(code, x, xq, xd, xs):
    """Quantise activation row x for weights of `code` (nothing for float weights): BitNet's
    one absmax scale per row for T2 rows (xd[0], xs[0]), else int8 blocks of the weights'."""
    if code == T2_CODE:
        quantize_row_t2(xq, xd, xs, x)
    elif code >= 0:
        _quantize_row_q8(xq, xd, xs, x, QDOT_BLOCK[code])


@njit(cache=True, inline="always")
def _row(r, x, wf, wq, code, xq, xd, xs):
    """Weight row r . activation row x (float) or its quantised form (xq, xd, xs). The one
    place a matrix's weight code is dispatched (with _rows4 and _quantize_for)."""
    if code < 0:
        return _fdot(wf[r], x)
    if code == T2_CODE:
        return t2dot(wq, (r,), xq, xd, xs)[0]
    return qdot(code, wq, (r,), xq, xd, xs)[0]


@njit(cache=True, inline="always")
def _rows4(r0, r1, r2, r3, x, wf, wq, code, xq, xd, xs):
    """Four weight rows . x in one pass over the activation (see quant.qdot)."""
    if code < 0:
        return _fdot(wf[r0], x), _fdot(wf[r1], x), _fdot(wf[r2], x), _fdot(wf[r3], x)
    if code == T2_CODE:
        return t2dot(wq, (r0, r1, r2, r3), xq, xd, xs)
    return qdot(code, wq, (r0, r1, r2, r3), xq, xd, xs)


@njit(cache=True, inline="always")
def _rows_into(dst, o, r0, r1, x, wf, wq, code, xq, xd, xs, accumulate, dst2, wq2, code2, shift2, pair):
    """dst[o + r - r0] (+)= W[r] . x for r in [r0, r1), four rows at a time; with `pair`,
    each group's rows r + shift2 of a second matrix (wf's float rows or wq2's blocks of
    code2; the same activation) after it into dst2: a GATE_UP unit's gate and up rows, read
    in step as the per-matrix kernel did (all gate rows, then all up rows, made the 2-thread
    MLP ~1.5% slower; one loop over both matrices made every matrix's rows slower)."""
    r = r0
    while r < r1:
        if r + 4 <= r1:
            v = _rows4(r, r + 1, r + 2, r + 3, x, wf, wq, code, xq, xd, xs)
            n = 4
        else:
            v = (_row(r, x, wf, wq, code, xq, xd, xs), np.float32(0.0), np.float32(0.0), np.float32(0.0))
            n = 1
        for k in range(n):
            i = o + r - r0 + k
            dst[i] = dst[i] + v[k] if accumulate else v[k]
        if pair:
            q = r + shift2
            if n == 4:
                v = _rows4(q, q + 1, q + 2, q + 3, x, wf, wq2, code2, xq, xd, xs)
            else:
                v = (_row(q, x, wf, wq2, code2, xq, xd, xs), np.float32(0.0), np.float32(0.0), np.float32(0.0))
            for k in range(n):
                dst2[o + r - r0 + k] = v[k]
        r += n


@njit(cache=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(cache=True)
def _attend_head(o, cache, pos, q0, k0, v0, hs, s):
    """o (hs,) = softmax over t <= pos of q . k_t / sqrt(hs), times v_t: q at cache[pos, q0:],
    k_t at cache[t, k0:], v_t at cache[t, v0:]; s (pos + 1,) scratch."""
    scale = np.float32(1.0 / np.sqrt(hs))
    q = cache[pos, q0:q0 + hs]
    m = np.float32(-np.inf)
    for t in range(pos + 1):
        s[t] = _fdot(cache[t, k0:k0 + hs], q) * scale
        m = max(m, s[t])
    z = np.float32(0.0)
    for t in range(pos + 1):
        s[t] = np.exp(s[t] - m)
        z += s[t]
    o[:] = 0.0
    for t in range(pos + 1):
        p = s[t] / z
        v = cache[t, v0:v0 + hs]
        for c in range(hs):
            o[c] += p * v[c]


@njit(cache=True, inline="always")
def _part(flat, t, n):
    """The n rows of one part of a kept matrix: t = (byte offset in flat, code, bytes per
    row); a float matrix's parts are (0, -1, 0): empty."""
    return flat[t[0]:t[0] + n * t[2]].reshape((n, t[2]))


# The phases of a token, in order: per layer QKV_ATT (or QKV, then ATT), OUT, GATE_UP, DOWN;
# then HEAD. What a phase's items are (each phase's items are cut into at most nthreads
# contiguous units):
QKV_ATT = 0   # kv heads: rows of its q, k and v heads, RoPE, cache append, its q heads' attention
QKV = 1       # heads of q | k | v: rows, RoPE, cache append
ATT = 2       # q heads: attention over the cache
OUT = 3       # groups of 4 out rows, added into the residual
GATE_UP = 4   # groups of 4 gate rows and the same up rows, silu(gate) * up
DOWN = 5      # groups of 4 down rows, added into the residual
HEAD = 6      # groups of 4 classifier rows


@njit(parallel=True, cache=True)
def _token(nthreads, ctr, kinds, layers, items, base, x, att, act, gu, logits, cache, pos, wf, wq, parts, head_f,
           head_q, head_code, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, inv_freq, half, NH, NKV, eps,
           hbuf, xqbuf, xdbuf, xsbuf, scores):
    """The token's one parallel region: nthreads workers (more than the pool runs at once is
    fine: iterations run one after another find the units claimed, or claim them)."""
    for t in prange(nthreads):
        hb, xq, xd, xs = hbuf[t], xqbuf[t], xdbuf[t], xsbuf[t]
        C, H, V = x.shape[0], act.shape[0], logits.shape[0]
        hs = cache.shape[2] // (NH + 2 * NKV)
        group = NH // NKV
        P = kinds.shape[0]
        p = 0        # the phase of this thread's unit
        ready = -1   # the phase whose input this thread holds in its scratch
        xin = x
        a = xq[:C]
        k = fetch_add(ctr, LINE, 1)
        while k < base[P]:
            while k >= base[p + 1]:
                p += 1
            wait_at_least(ctr, 2 * LINE, base[p])
            kind, l = kinds[p], layers[p]
            if ready != p:   # this phase's input, into this thread's scratch
                ready = p
                if kind == OUT or kind == DOWN:
                    src, sub, code = (att, attn_sub_norm, parts[1, l, 0, 1]) if kind == OUT \
                        else (act, ffn_sub_norm, parts[3, l, 0, 1])
                    xin = src
                    if sub.shape[1]:   # BitNet's sub-norm
                        xin = hb[:src.shape[0]]
                        _rmsnorm_row(xin, src, sub[l], eps)
                elif kind != ATT:
                    nw, code = (attn_norm[l], parts[0, l, 0, 1]) if kind <= QKV else \
                        ((ffn_norm[l], parts[2, l, 0, 1]) if kind == GATE_UP else (norm_f, head_code))
                    xin = hb[:C]
                    _rmsnorm_row(xin, x, nw, eps)
                if kind != ATT:
                    a = xq[:xin.shape[0]]
                    _quantize_for(code, xin, a, xd, xs)
            u, m, n = k - base[p], base[p + 1] - base[p], items[p]
            i0, i1 = u * n // m, (u + 1) * n // m
            if kind == ATT:
                for h in range(i0, i1):
                    g = h // group
                    _attend_head(att[h * hs:(h + 1) * hs], cache[l], pos, h * hs, (NH + g) * hs,
                                 (NH + NKV + g) * hs, hs, scores[h])
            nseg = (i1 - i0) * (group + 2) if kind == QKV_ATT else \
                (i1 - i0 if kind == QKV else (0 if kind == ATT else 1))
            for s in range(nseg):   # row ranges of one matrix part each, through the one row-dot call
                j, kk, g = 0, 0, 0
                if kind <= QKV:   # head j of q | k | v
                    g = i0 + s // (group + 2)
                    kk = s % (group + 2)
                    j = i0 + s if kind == QKV else (g * group + kk if kk < group else
                                                    (NH + g if kk == group else NH + NKV + g))
                    mat, part = 0, 0 if j < NH else (1 if j < NH + NKV else 2)
                    first = (0, NH, NH + NKV)[part] * hs   # the part's first row in the (q | k | v) matrix
                    nrows = (NH, NKV, NKV)[part] * hs
                    r0, r1 = j * hs - first, j * hs - first + hs
                    dst, o, acc = cache[l, pos], j * hs, False
                else:
                    mat, part = (1, 0) if kind == OUT else ((2, 0) if kind == GATE_UP else (3, 0))
                    nrows = C if kind != GATE_UP else H
                    if kind == HEAD:
                        nrows = V
                    first = part * H
                    r0, r1 = 4 * i0, min(4 * i1, nrows)
                    dst, o, acc = (x, r0, True) if kind == OUT or kind == DOWN else \
                        ((gu[0], r0, False) if kind == GATE_UP else (logits, r0, False))
                if kind == HEAD:
                    wfm, wqm, code = head_f, head_q, head_code
                    wq2, code2 = wqm, code
                    first = 0
                else:
                    tp = parts[mat, l, part]
                    wfm, wqm, code = wf[mat][l], _part(wq[mat], tp, nrows), tp[1]
                    wq2, code2 = wqm, code
                    if kind == GATE_UP:   # the up rows, read with the gate rows
                        tp = parts[mat, l, 1]
                        wq2, code2 = _part(wq[mat], tp, nrows), tp[1]
                off = first if code < 0 else 0   # float rows: the whole matrix; blocks: the part's own array
                _rows_into(dst, o, r0 + off, r1 + off, xin, wfm, wqm, code, a, xd, xs, acc,
                           gu[1], wq2, code2, H if code2 < 0 else 0, kind == GATE_UP)
                if kind <= QKV and part < 2:   # RoPE in place (it rewrites each pair it reads)
                    head = dst[j * hs:(j + 1) * hs]
                    _rotate_row(head, head, pos, inv_freq, half, 1.0, 1, hs, False)
                if kind == QKV_ATT and kk == group + 1:   # the kv head's k and v are in: its q heads' attention
                    for h in range(g * group, (g + 1) * group):
                        _attend_head(att[h * hs:(h + 1) * hs], cache[l], pos, h * hs, (NH + g) * hs,
                                     (NH + NKV + g) * hs, hs, scores[h])
                if kind == GATE_UP:
                    for r in range(r0, r1):
                        act[r] = _silu_mul(gu[0, r], gu[1, r])
            fetch_add(ctr, 2 * LINE, 1)
            k = fetch_add(ctr, LINE, 1)


@njit(cache=True)
def llama_decode_step(logits, token, pos, wte, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, wf, wq,
                      parts, head_f, head_q, head_code, cache, inv_freq, half, NH, NKV, H, eps, nthreads):
    """The logits (rows of the classifier) after token `token` at position `pos`, whose
    rotated qkv rows are appended to cache (L, capacity, W) at row pos.

    wf: the four per-layer matrices (qkv, out, gate_up, down) as float32 (L, OC, C) arrays,
    an (L, 0, 0) one where a matrix is kept as blocks; wq: their blocks, each one flat uint8
    array, layer after layer, part after part (q, k, v; gate, up); parts (4, L, 3, 3): per
    matrix, layer and part (byte offset in wq, block code, bytes per row), code -1 for float,
    so a layer may mix block types (a Q4_K_M file's Q4_K q/k and Q6_K v rows). head_code:
    the classifier's (-1 float: head_f, else head_q). H: the MLP's width. attn_sub_norm (L,
    NH*hs) / ffn_sub_norm (L, H): BitNet's RMSNorms before the out / down projections, or (L, 0).
    nthreads (>= 1): the workers (numba.get_num_threads() of the caller: read here, it would
    stop Numba caching this function); the bits do not depend on it. The kv heads are a
    phase's items when nthreads divides them, else the heads (QKV, then ATT)."""
    L, C = attn_norm.shape
    hs = cache.shape[2] // (NH + 2 * NKV)
    width = max(C, H, NH * hs)
    split = NKV % nthreads != 0
    P = L * (5 if split else 4) + 1
    kinds, layers, items = np.empty(P, np.int64), np.empty(P, np.int64), np.empty(P, np.int64)
    p = 0
    for l in range(L):
        for kind in (QKV_ATT, QKV, ATT, OUT, GATE_UP, DOWN):
            if (kind == QKV_ATT and split) or ((kind == QKV or kind == ATT) and not split):
                continue
            kinds[p], layers[p] = kind, l
            p += 1
    kinds[p], layers[p] = HEAD, 0
    base = np.zeros(P + 1, np.int64)   # phase p's units: base[p] .. base[p + 1] - 1
    for p in range(P):
        kind = kinds[p]
        items[p] = NKV if kind == QKV_ATT else (NH + 2 * NKV if kind == QKV else (NH if kind == ATT else (
            (H + 3) // 4 if kind == GATE_UP else ((logits.shape[0] + 3) // 4 if kind == HEAD else (C + 3) // 4))))
        base[p + 1] = base[p] + min(nthreads, items[p])
    x = wte[token].copy()
    att = np.empty(NH * hs, np.float32)
    act = np.empty(H, np.float32)
    gu = np.empty((2, H), np.float32)
    # each worker's input row and its quantised form, a cache line or more apart (written per phase)
    hbuf = np.empty((nthreads, width + 16), np.float32)
    xqbuf = np.empty((nthreads, width + 64), np.int8)
    xdbuf = np.empty((nthreads, width // QK + 1 + 16), np.float32)   # + 1: a T2 row's one scale
    xsbuf = np.empty((nthreads, width // QK + 16), np.int32)
    scores = np.empty((NH, pos + 1), np.float32)
    ctr = np.zeros(3 * LINE, np.int64)   # claims at LINE, done units at 2 LINE: lines of their own
    _token(nthreads, ctr, kinds, layers, items, base, x, att, act, gu, logits, cache, pos, wf, wq, parts, head_f,
           head_q, head_code, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, inv_freq, half, NH, NKV, eps,
           hbuf, xqbuf, xdbuf, xsbuf, scores)
