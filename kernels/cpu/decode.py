"""One decoding step of a Llama-family model (B = 1, T = 1) as a handful of kernel launches.

The tape path runs ~15 ops per layer, each a Python call and a parallel region; at 58M
parameters a token is ~1 ms of arithmetic, so that overhead and thread start-up dominated
(and 2 threads ran slower than 1). Here one call does the whole token: per layer four
parallel regions, each splitting independent work across threads,

    rmsnorm -> [quantise x] -> per kv head: its q, k, v rows, RoPE, KV-cache append,
                               attention of its q heads                 (qkv_attention)
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
def swiglu_matvec(act, x, wf, wq, code, xq, xd, xs):
    """act[i] = silu(gate_i . x) * (up_i . x), gate rows 0..H-1 and up rows H..2H-1 of W;
    gate and up rows i, i+1 in one four-row pass."""
    a = xq[:x.shape[0]]
    _quantize_for(code, x, a, xd, xs)
    H = act.shape[0]
    for p in prange((H + 1) // 2):
        i = 2 * p
        if i + 1 < H:
            g0, g1, u0, u1 = _rows4(i, i + 1, H + i, H + i + 1, x, wf, wq, code, a, xd, xs)
            act[i], act[i + 1] = _silu_mul(g0, u0), _silu_mul(g1, u1)
        else:
            act[i] = _silu_mul(_row(i, x, wf, wq, code, a, xd, xs), _row(H + i, x, wf, wq, code, a, xd, xs))


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


@njit(parallel=True, cache=True)
def qkv_attention(att, x, wf, wq, code, xq, xd, xs, cache, pos, inv_freq, half, NH, NKV, scores):
    """The first half of attention for position pos, one task per key/value head g: the rows
    of W . x for g's query heads and for its k and v heads, written to cache[pos] (layout
    q | k | v heads), RoPE on them, then attention of g's query heads over cache[0..pos] into
    att (NH*hs,). The tasks share nothing, so one parallel region does the work of three."""
    a = xq[:x.shape[0]]
    _quantize_for(code, x, a, xd, xs)
    hs = cache.shape[1] // (NH + 2 * NKV)
    group = NH // NKV
    row = cache[pos]
    for g in prange(NKV):
        k0, v0 = (NH + g) * hs, (NH + NKV + g) * hs
        q0 = g * group * hs
        _rows_into(row, q0, q0, q0 + group * hs, x, wf, wq, code, a, xd, xs, False)
        _rows_into(row, k0, k0, k0 + hs, x, wf, wq, code, a, xd, xs, False)
        _rows_into(row, v0, v0, v0 + hs, x, wf, wq, code, a, xd, xs, False)
        for h in range(g * group, (g + 1) * group):   # RoPE in place (it rewrites each pair it reads)
            q = row[h * hs:(h + 1) * hs]
            _rotate_row(q, q, pos, inv_freq, half, 1.0, 1, hs, False)
        k = row[k0:k0 + hs]
        _rotate_row(k, k, pos, inv_freq, half, 1.0, 1, hs, False)
        for h in range(g * group, (g + 1) * group):
            _attend_head(att[h * hs:(h + 1) * hs], cache, pos, h * hs, k0, v0, hs, scores[h])


@njit(cache=True)
def llama_decode_step(logits, token, pos, wte, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, wf, wq,
                      codes, head_f, head_q, cache, inv_freq, half, NH, NKV, eps):
    """The logits (rows of the classifier) after token `token` at position `pos`, whose
    rotated qkv rows are appended to cache (L, capacity, W) at row pos.

    wf / wq: tuples of the four per-layer matrices (qkv, out, gate_up, down), each (L, OC,
    C) float32 / (L, OC, bytes) uint8 (an empty array for the unused one); codes (5,): their
    block codes and the classifier's (-1 float: head_f, else head_q). attn_sub_norm (L, NH*hs)
    / ffn_sub_norm (L, H): BitNet's RMSNorms before the out / down projections, or (L, 0)."""
    L, C = attn_norm.shape
    W = cache.shape[2]
    hs = W // (NH + 2 * NKV)
    H = (wf[2].shape[1] if codes[2] < 0 else wq[2].shape[1]) // 2
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
        _rmsnorm_row(h, x, attn_norm[l], eps)
        qkv_attention(att, h, wf[0][l], wq[0][l], codes[0], xq, xd, xs, cache[l], pos, inv_freq, half, NH, NKV,
                      scores)
        if attn_sub_norm.shape[1]:
            _rmsnorm_row(att, att, attn_sub_norm[l], eps)
        matvec(x, att, wf[1][l], wq[1][l], codes[1], xq, xd, xs, True)
        _rmsnorm_row(h, x, ffn_norm[l], eps)
        swiglu_matvec(act, h, wf[2][l], wq[2][l], codes[2], xq, xd, xs)
        if ffn_sub_norm.shape[1]:
            _rmsnorm_row(act, act, ffn_sub_norm[l], eps)
        matvec(x, act, wf[3][l], wq[3][l], codes[3], xq, xd, xs, True)
    _rmsnorm_row(h, x, norm_f, eps)
    matvec(logits, h, head_f, head_q, codes[4], xq, xd, xs, False)
