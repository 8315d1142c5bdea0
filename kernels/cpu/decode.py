"""One decoding step of a Llama-family model (B = 1, T = 1) in one parallel region.

The tape path runs ~15 ops per layer, each a Python call and a parallel region; at 58M
parameters a token is ~1 ms of arithmetic, so that overhead and thread start-up dominated
(and 2 threads ran slower than 1). Here one call does the whole token, and its threads
meet at phases instead of forking and joining a region per matrix (121 regions a token of
SmolLM2-135M before). Per layer four phases, each a list of independent chunks:

    rmsnorm -> [quantise x] -> k and v heads (rows, RoPE on k, KV-cache append), then per
                               q head its rows, RoPE, attention over the cache   (qkv + attention)
    [quantise] -> out rows, added into the residual in place                       (out)
    rmsnorm -> [quantise] -> gate_i, up_i rows -> silu(gate_i) * up_i              (gate/up)
    [quantise] -> down rows, added into the residual                               (down)

then the final norm and the classifier rows. Every thread computes a phase's small input
(the norm, the activation quantised once per matrix) into its own scratch, claims chunks
through atomic counters (sync.py; deadlock-free whatever the thread count, see there) and
waits only for the phase's chunks to be done. Each weight byte is read once per token. A
matrix is float32 (code -1: `wf`, rows dotted in float32 with
reassociation so they vectorise) or ggml blocks (code >= 0, see quant.QDOT_CODES: `wq`,
integer dots against the activation quantised once per matrix), four rows per call where
the rows allow (quant.qdot: one pass over the activation serves four weight rows), or
BitNet's packed ternary T2 rows (bitnet.T2_CODE: bitnet.t2dot against the activation
quantised per token; a BitNet model's sub-norms run before the out and down rows). A new
weight code slots in at _quantize_for, _row and _rows4. No BLAS is called, so no second
thread pool competes with Numba's. Which thread runs which row never changes a row's
arithmetic: any thread count gives the same bits.

Numba's cache keys these kernels on this file alone, with quant's globals (QDOT_BLOCK, the
qdot dispatch) and its intrinsics' code (and sync.py's) compiled in: a new code in
quant.QDOT_CODES (Q5_0 = 4 was the last) or a change to the row dots' code (the last: the
K-quants' scales as vectors) or to sync.py must come with an edit here, or a stale cache runs the old code (seen: IndexError
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


# ---------------------------------------------------------------------- one parallel region a token
# A phase's chunks (rows of a matrix, heads) are split into one contiguous range per thread;
# a thread claims chunks of its own range front to back (so it streams its rows as one
# sequence, which the row dots' prefetch sweep follows), then of the others' ranges. The
# counters (sync.py) of a phase, each on its own cache line: done, k/v done, the k/v claim,
# then one claim counter per range: (T + 3) lines for T threads.
CHUNK_ROWS = 32         # rows of a layer's matrix per claimed chunk (a multiple of 4)
HEAD_CHUNK_ROWS = 256   # classifier rows per claimed chunk


@njit(cache=True, inline="always")
def _next_chunk(ctr, b, n, T, tid, j):
    """The next chunk of the phase whose counters start at ctr[b] (n chunks, T ranges) for
    thread tid, looking in its own range (j = 0) then the next ones; (chunk, j), chunk = n
    when none is left."""
    while j < T:
        r = (tid + j) % T
        c = r * n // T + fetch_add(ctr, b + (3 + r) * LINE, 1)
        if c < (r + 1) * n // T:
            return c, j
        j += 1
    return n, j


@njit(cache=True, inline="always")
def _input(x, norm_w, eps, buf, code, xq, xd, xs):
    """A phase's input in this thread's scratch: x, or rmsnorm(x) * norm_w into buf where
    norm_w is not empty, then quantised for weights of `code`; returns (the float row, xq)."""
    if norm_w.shape[0]:
        _rmsnorm_row(buf[:x.shape[0]], x, norm_w, eps)
        x = buf[:x.shape[0]]
    a = xq[:x.shape[0]]
    _quantize_for(code, x, a, xd, xs)
    return x, a


@njit(cache=True)
def _matvec_phase(ctr, b, T, tid, out, x, norm_w, eps, wf, wq, code, buf, xq, xd, xs, rows, accumulate):
    """out[r] (+)= W[r] . x' for every row r, x' = x or its rmsnorm (norm_w), in chunks of
    `rows` rows; returns when every chunk is done."""
    OC = out.shape[0]
    n = (OC + rows - 1) // rows
    xin, a = _input(x, norm_w, eps, buf, code, xq, xd, xs)
    c, j = _next_chunk(ctr, b, n, T, tid, 0)
    while c < n:
        r0 = c * rows
        _rows_into(out, r0, r0, min(r0 + rows, OC), xin, wf, wq, code, a, xd, xs, accumulate)
        fetch_add(ctr, b, 1)
        c, j = _next_chunk(ctr, b, n, T, tid, j)
    wait_at_least(ctr, b, n)


@njit(cache=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(cache=True)
def _swiglu_phase(ctr, b, T, tid, act, x, norm_w, eps, wf, wq, codes, buf, xq, xd, xs, rows):
    """act[i] = silu(gate_i . x') * (up_i . x'), x' = rmsnorm(x) * norm_w; wf / wq / codes
    are (gate, up) pairs (the two parts may hold different block types of one activation
    format); four gate rows, then the same four up rows, at a time."""
    H = act.shape[0]
    n = (H + rows - 1) // rows
    xin, a = _input(x, norm_w, eps, buf, codes[0], xq, xd, xs)
    c, j = _next_chunk(ctr, b, n, T, tid, 0)
    while c < n:
        i1 = min(c * rows + rows, H)
        for i in range(c * rows, i1, 4):
            if i + 4 <= i1:
                g = _rows4(i, i + 1, i + 2, i + 3, xin, wf[0], wq[0], codes[0], a, xd, xs)
                u = _rows4(i, i + 1, i + 2, i + 3, xin, wf[1], wq[1], codes[1], a, xd, xs)
                for k in range(4):
                    act[i + k] = _silu_mul(g[k], u[k])
            else:
                for k in range(i, i1):
                    act[k] = _silu_mul(_row(k, xin, wf[0], wq[0], codes[0], a, xd, xs),
                                       _row(k, xin, wf[1], wq[1], codes[1], a, xd, xs))
        fetch_add(ctr, b, 1)
        c, j = _next_chunk(ctr, b, n, T, tid, j)
    wait_at_least(ctr, b, n)


@njit(cache=True)
def _qkv_attention_phase(ctr, b, T, tid, att, x, norm_w, eps, wf, wq, codes, buf, xq, xd, xs, cache, pos, inv_freq,
                         half, NH, NKV, scores):
    """The first half of attention for position pos: x' = rmsnorm(x) * norm_w; the rows of
    W . x' written to cache[pos] (layout q | k | v heads), RoPE on q and k, then each query
    head's attention over cache[0..pos] into att (NH*hs,). wf / wq / codes: the (q, k, v)
    parts of W. First the 2 NKV k and v heads, claimed by all threads from one counter, then
    the NH q heads as ranges; a q head's attention waits for every k/v head, all of them
    claimed (so being run by a live thread) before any thread moves on to q heads."""
    W = cache.shape[1]
    hs = W // (NH + 2 * NKV)
    group = NH // NKV
    row = cache[pos]
    xin, a = _input(x, norm_w, eps, buf, codes[0], xq, xd, xs)
    c = fetch_add(ctr, b + 2 * LINE, 1)
    while c < 2 * NKV:
        part, g = 1 + c // NKV, c % NKV
        o = (NH + c) * hs
        _rows_into(row, o, g * hs, (g + 1) * hs, xin, wf[part], wq[part], codes[part], a, xd, xs, False)
        if part == 1:   # RoPE in place (it rewrites each pair it reads)
            k = row[o:o + hs]
            _rotate_row(k, k, pos, inv_freq, half, 1.0, 1, hs, False)
        fetch_add(ctr, b + LINE, 1)
        c = fetch_add(ctr, b + 2 * LINE, 1)
    h, j = _next_chunk(ctr, b, NH, T, tid, 0)
    while h < NH:
        _rows_into(row, h * hs, h * hs, (h + 1) * hs, xin, wf[0], wq[0], codes[0], a, xd, xs, False)
        q = row[h * hs:(h + 1) * hs]
        _rotate_row(q, q, pos, inv_freq, half, 1.0, 1, hs, False)
        wait_at_least(ctr, b + LINE, 2 * NKV)
        g = h // group
        _attend_head(att[h * hs:(h + 1) * hs], cache, pos, h * hs, (NH + g) * hs, (NH + NKV + g) * hs, hs, scores[h])
        fetch_add(ctr, b, 1)
        h, j = _next_chunk(ctr, b, NH, T, tid, j)
    wait_at_least(ctr, b, NH)


@njit(cache=True, inline="always")
def _part(flat, t, n):
    """The n rows of one part of a kept matrix: t = (byte offset in flat, code, bytes per
    row); a float matrix's parts are (0, -1, 0): empty."""
    return flat[t[0]:t[0] + n * t[2]].reshape((n, t[2]))


@njit(cache=True)
def _token(ctr, T, tid, buf, xq, xd, xs, logits, x, att, act, scores, pos, attn_norm, ffn_norm, norm_f,
           attn_sub_norm, ffn_sub_norm, wf, wq, parts, head_f, head_q, head_code, cache, inv_freq, half, NH, NKV, H,
           eps):
    """Thread tid's part of a token (of T threads): every phase in order (4 a layer: qkv +
    attention, out, gate/up, down; then the classifier), running chunks while any are left
    and waiting for the phase's last before the next; buf / xq / xd / xs: its scratch. Each
    thread computes a phase's norm and quantised input itself (a few microseconds), so no
    thread waits on a serial step between phases."""
    L, C = attn_norm.shape
    W = cache.shape[2]
    hs = W // (NH + 2 * NKV)
    q1, k1 = NH * hs, (NH + NKV) * hs
    S = (T + 3) * LINE   # counters a phase
    for l in range(L):
        b = 4 * l * S
        t, f = parts[0, l], wf[0][l]
        _qkv_attention_phase(ctr, b, T, tid, att, x, attn_norm[l], eps, (f[:q1], f[q1:k1], f[k1:]),
                             (_part(wq[0], t[0], q1), _part(wq[0], t[1], k1 - q1), _part(wq[0], t[2], W - k1)),
                             (t[0, 1], t[1, 1], t[2, 1]), buf, xq, xd, xs, cache[l], pos, inv_freq, half, NH, NKV,
                             scores)
        t = parts[1, l]
        _matvec_phase(ctr, b + S, T, tid, x, att, attn_sub_norm[l], eps, wf[1][l], _part(wq[1], t[0], C), t[0, 1],
                      buf, xq, xd, xs, CHUNK_ROWS, True)
        t, f = parts[2, l], wf[2][l]
        _swiglu_phase(ctr, b + 2 * S, T, tid, act, x, ffn_norm[l], eps, (f[:H], f[H:]),
                      (_part(wq[2], t[0], H), _part(wq[2], t[1], H)), (t[0, 1], t[1, 1]), buf, xq, xd, xs,
                      CHUNK_ROWS)
        t = parts[3, l]
        _matvec_phase(ctr, b + 3 * S, T, tid, x, act, ffn_sub_norm[l], eps, wf[3][l], _part(wq[3], t[0], C),
                      t[0, 1], buf, xq, xd, xs, CHUNK_ROWS, True)
    _matvec_phase(ctr, 4 * L * S, T, tid, logits, x, norm_f, eps, head_f, head_q, head_code, buf, xq, xd, xs,
                  HEAD_CHUNK_ROWS, False)


@njit(parallel=True, cache=True)
def llama_decode_step(logits, token, pos, wte, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, wf, wq,
                      parts, head_f, head_q, head_code, cache, inv_freq, half, NH, NKV, H, eps, nthreads):
    """The logits (rows of the classifier) after token `token` at position `pos`, whose
    rotated qkv rows are appended to cache (L, capacity, W) at row pos, by `nthreads` (>= 1)
    threads in one parallel region (numba.get_num_threads(); any count gives the same bits).

    wf: the four per-layer matrices (qkv, out, gate_up, down) as float32 (L, OC, C) arrays,
    an (L, 0, 0) one where a matrix is kept as blocks; wq: their blocks, each one flat uint8
    array, layer after layer, part after part (q, k, v; gate, up); parts (4, L, 3, 3): per
    matrix, layer and part (byte offset in wq, block code, bytes per row), code -1 for float,
    so a layer may mix block types (a Q4_K_M file's Q4_K q/k and Q6_K v rows). head_code:
    the classifier's (-1 float: head_f, else head_q). H: the MLP's width. attn_sub_norm (L,
    NH*hs) / ffn_sub_norm (L, H): BitNet's RMSNorms before the out / down projections, or (L, 0)."""
    L, C = attn_norm.shape
    hs = cache.shape[2] // (NH + 2 * NKV)
    width = max(C, H, NH * hs)
    x = wte[token].copy()
    att = np.empty(NH * hs, np.float32)
    act = np.empty(H, np.float32)
    scores = np.empty((NH, pos + 1), np.float32)
    buf = np.empty((nthreads, width), np.float32)
    xq = np.empty((nthreads, width), np.int8)
    xd = np.empty((nthreads, width // QK + 1), np.float32)   # + 1: a T2 row's one scale
    xs = np.empty((nthreads, width // QK), np.int32)
    ctr = np.zeros((4 * L + 1) * (nthreads + 3) * LINE, np.int64)
    for i in prange(nthreads):
        _token(ctr, nthreads, i, buf[i], xq[i], xd[i], xs[i], logits, x, att, act, scores, pos, attn_norm, ffn_norm,
               norm_f, attn_sub_norm, ffn_sub_norm, wf, wq, parts, head_f, head_q, head_code, cache, inv_freq, half,
               NH, NKV, H, eps)
