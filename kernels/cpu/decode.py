"""One decoding step of a Llama-family model (B = 1, T = 1) as a handful of kernel launches.

The tape path runs ~15 ops per layer, each a Python call and a parallel region; at 58M
parameters a token is ~1 ms of arithmetic, so that overhead and thread start-up dominated
(and 2 threads ran slower than 1). Here one call does the whole token: per layer four
parallel regions, each splitting independent work across threads,

    rmsnorm -> [quantise x] -> per kv head: its q, k, v rows, RoPE, KV-cache append,
                               attention of its q heads                 (qkv_attention)
               (or, when the thread count does not divide the kv heads, per head: its rows,
                RoPE, cache append (qkv_rows); then per q head its attention (attention))
    [quantise] -> out rows, added into the residual in place            (matvec)
    rmsnorm -> [quantise] -> gate_i, up_i rows -> silu(gate_i) * up_i   (swiglu_matvec)
    [quantise] -> down rows, added into the residual                    (matvec)

then the final norm and the classifier rows. The small per-token work (a norm, quantising
one activation row) runs on the calling thread between regions. Each weight byte is read
once per token. A matrix is float32 (code -1: `wf`, rows dotted in float32 with
reassociation so they vectorise) or ggml blocks (code >= 0, see quant.QDOT_CODES: `wq`,
integer dots against the activation quantised once per matrix), four rows per call where
the rows allow (quant.qdot: one pass over the activation serves four weight rows), or
BitNet's packed ternary T2 rows (bitnet.T2_CODE: bitnet.t2dot against the activation
quantised per token; a BitNet model's sub-norms run before the out and down rows). A new
weight code slots in at _quantize_for, _row and _rows4. No BLAS is called, so no second
thread pool competes with Numba's.

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
def _rows_into(dst, o, r0, r1, x, wf, wq, code, xq, xd, xs, accumulate):
    """dst[o + r - r0] (+)= W[r] . x for r in [r0, r1), four rows at a time."""
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
        r += n


@njit(parallel=True, cache=True)
def matvec(out, x, wf, wq, code, xq, xd, xs, accumulate):
    """out[r] (+)= W[r] . x for every row r, groups of 4 rows split across threads (xq, xd,
    xs: scratch for x quantised, at least as long as x, x/32, x/32)."""
    a = xq[:x.shape[0]]
    _quantize_for(code, x, a, xd, xs)
    OC = out.shape[0]
    for g in prange((OC + 3) // 4):
        _rows_into(out, 4 * g, 4 * g, min(4 * g + 4, OC), x, wf, wq, code, a, xd, xs, accumulate)


@njit(cache=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, cache=True)
def swiglu_matvec(act, x, wf, wq, codes, xq, xd, xs):
    """act[i] = silu(gate_i . x) * (up_i . x): wf / wq / codes are (gate, up) pairs (the
    float rows, the blocks, the codes: the two parts may hold different block types of one
    activation format); four gate rows, then the same four up rows, per task."""
    a = xq[:x.shape[0]]
    _quantize_for(codes[0], x, a, xd, xs)
    H = act.shape[0]
    for p in prange((H + 3) // 4):
        i = 4 * p
        if i + 4 <= H:
            g = _rows4(i, i + 1, i + 2, i + 3, x, wf[0], wq[0], codes[0], a, xd, xs)
            u = _rows4(i, i + 1, i + 2, i + 3, x, wf[1], wq[1], codes[1], a, xd, xs)
            for k in range(4):
                act[i + k] = _silu_mul(g[k], u[k])
        else:
            for k in range(i, H):
                act[k] = _silu_mul(_row(k, x, wf[0], wq[0], codes[0], a, xd, xs),
                                   _row(k, x, wf[1], wq[1], codes[1], a, xd, xs))


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
def _head_rows(row, j, x, wf, wq, codes, a, xd, xs, pos, inv_freq, half, NH, NKV, hs):
    """Head j of the (q | k | v) outputs (NH q heads, then NKV k, then NKV v heads): its hs
    rows of W . x into row[j*hs:] (the cache row's layout), RoPE on it if it is a q or k head.
    wf / wq / codes: the (q, k, v) parts of W (float rows, blocks, codes; one activation format)."""
    part = 0 if j < NH else (1 if j < NH + NKV else 2)
    r0 = (j - (0, NH, NH + NKV)[part]) * hs
    _rows_into(row, j * hs, r0, r0 + hs, x, wf[part], wq[part], codes[part], a, xd, xs, False)
    if part < 2:   # RoPE in place (it rewrites each pair it reads)
        head = row[j * hs:(j + 1) * hs]
        _rotate_row(head, head, pos, inv_freq, half, 1.0, 1, hs, False)


@njit(parallel=True, cache=True)
def qkv_attention(att, x, wf, wq, codes, xq, xd, xs, cache, pos, inv_freq, half, NH, NKV, scores):
    """The first half of attention for position pos, one task per key/value head g: the rows
    of W . x for g's query heads and for its k and v heads, written to cache[pos] (layout
    q | k | v heads), RoPE on them, then attention of g's query heads over cache[0..pos] into
    att (NH*hs,). The tasks share nothing, so one parallel region does the work of three; but
    NKV tasks split unevenly when the thread count does not divide NKV (SmolLM2-135M's 3 on 2
    threads: 2:1), and then qkv_rows + attention split the same work per head instead."""
    a = xq[:x.shape[0]]
    _quantize_for(codes[0], x, a, xd, xs)
    hs = cache.shape[1] // (NH + 2 * NKV)
    group = NH // NKV
    for g in prange(NKV):
        for k in range(group + 2):   # g's query heads, its k head, its v head
            j = g * group + k if k < group else (NH + g if k == group else NH + NKV + g)
            _head_rows(cache[pos], j, x, wf, wq, codes, a, xd, xs, pos, inv_freq, half, NH, NKV, hs)
        for h in range(g * group, (g + 1) * group):
            _attend_head(att[h * hs:(h + 1) * hs], cache, pos, h * hs, (NH + g) * hs, (NH + NKV + g) * hs, hs, scores[h])


@njit(parallel=True, cache=True)
def qkv_rows(x, wf, wq, codes, xq, xd, xs, cache, pos, inv_freq, half, NH, NKV):
    """qkv_attention's rows and RoPE alone, one task per head of q | k | v (NH + 2 NKV tasks)."""
    a = xq[:x.shape[0]]
    _quantize_for(codes[0], x, a, xd, xs)
    hs = cache.shape[1] // (NH + 2 * NKV)
    for j in prange(NH + 2 * NKV):
        _head_rows(cache[pos], j, x, wf, wq, codes, a, xd, xs, pos, inv_freq, half, NH, NKV, hs)


@njit(parallel=True, cache=True)
def attention(att, cache, pos, NH, NKV, scores):
    """qkv_attention's attention alone, one task per query head (after qkv_rows)."""
    hs = cache.shape[1] // (NH + 2 * NKV)
    group = NH // NKV
    for h in prange(NH):
        g = h // group
        _attend_head(att[h * hs:(h + 1) * hs], cache, pos, h * hs, (NH + g) * hs, (NH + NKV + g) * hs, hs, scores[h])


@njit(cache=True, inline="always")
def _part(flat, t, n):
    """The n rows of one part of a kept matrix: t = (byte offset in flat, code, bytes per
    row); a float matrix's parts are (0, -1, 0): empty."""
    return flat[t[0]:t[0] + n * t[2]].reshape((n, t[2]))


@njit(cache=True)
def llama_decode_step(logits, token, pos, wte, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, wf, wq,
                      parts, head_f, head_q, head_code, cache, inv_freq, half, NH, NKV, H, eps, split_heads):
    """The logits (rows of the classifier) after token `token` at position `pos`, whose
    rotated qkv rows are appended to cache (L, capacity, W) at row pos.

    wf: the four per-layer matrices (qkv, out, gate_up, down) as float32 (L, OC, C) arrays,
    an (L, 0, 0) one where a matrix is kept as blocks; wq: their blocks, each one flat uint8
    array, layer after layer, part after part (q, k, v; gate, up); parts (4, L, 3, 3): per
    matrix, layer and part (byte offset in wq, block code, bytes per row), code -1 for float,
    so a layer may mix block types (a Q4_K_M file's Q4_K q/k and Q6_K v rows). head_code:
    the classifier's (-1 float: head_f, else head_q). H: the MLP's width. attn_sub_norm (L,
    NH*hs) / ffn_sub_norm (L, H): BitNet's RMSNorms before the out / down projections, or (L, 0).
    split_heads: the q/k/v rows and the attention in two regions split per head (qkv_rows,
    attention) instead of one split per kv head (qkv_attention): for a thread count that does
    not divide NKV."""
    L, C = attn_norm.shape
    W = cache.shape[2]
    hs = W // (NH + 2 * NKV)
    q1, k1 = NH * hs, (NH + NKV) * hs
    width = max(C, H, NH * hs)
    x = wte[token].copy()
    h = np.empty(C, np.float32)
    att = np.empty(NH * hs, np.float32)
    act = np.empty(H, np.float32)
    xq = np.empty(width, np.int8)
    xd = np.empty(width // QK + 1, np.float32)   # + 1: a T2 row's one scale
    xs = np.empty(width // QK, np.int32)
    scores = np.empty((NH, pos + 1), np.float32)
    for l in range(L):
        t, f = parts[0, l], wf[0][l]
        _rmsnorm_row(h, x, attn_norm[l], eps)
        qkv_f = (f[:q1], f[q1:k1], f[k1:])
        qkv_q = (_part(wq[0], t[0], q1), _part(wq[0], t[1], k1 - q1), _part(wq[0], t[2], W - k1))
        qkv_codes = (t[0, 1], t[1, 1], t[2, 1])
        if split_heads:
            qkv_rows(h, qkv_f, qkv_q, qkv_codes, xq, xd, xs, cache[l], pos, inv_freq, half, NH, NKV)
            attention(att, cache[l], pos, NH, NKV, scores)
        else:
            qkv_attention(att, h, qkv_f, qkv_q, qkv_codes, xq, xd, xs, cache[l], pos, inv_freq, half, NH, NKV, scores)
        if attn_sub_norm.shape[1]:
            _rmsnorm_row(att, att, attn_sub_norm[l], eps)
        t = parts[1, l]
        matvec(x, att, wf[1][l], _part(wq[1], t[0], C), t[0, 1], xq, xd, xs, True)
        _rmsnorm_row(h, x, ffn_norm[l], eps)
        t, f = parts[2, l], wf[2][l]
        swiglu_matvec(act, h, (f[:H], f[H:]), (_part(wq[2], t[0], H), _part(wq[2], t[1], H)), (t[0, 1], t[1, 1]),
                      xq, xd, xs)
        if ffn_sub_norm.shape[1]:
            _rmsnorm_row(act, act, ffn_sub_norm[l], eps)
        t = parts[3, l]
        matvec(x, act, wf[3][l], _part(wq[3], t[0], C), t[0, 1], xq, xd, xs, True)
    _rmsnorm_row(h, x, norm_f, eps)
    matvec(logits, h, head_f, head_q, head_code, xq, xd, xs, False)
