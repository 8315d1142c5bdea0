"""One decoding step of a Llama-family model (B = 1, T = 1) as a handful of kernel launches.

The tape path runs ~15 ops per layer, each a Python call and a parallel region; at 58M
parameters a token is ~1 ms of arithmetic, so that overhead and thread start-up dominated
(and 2 threads ran slower than 1). Here one call does the whole token: per layer two
parallel regions (the 121 fork/joins of a SmolLM2-135M token down to 61),

    rmsnorm -> [quantise x] -> q, k, v heads' rows, RoPE, KV-cache append, attention of
                               each q head; then the out rows, added into the residual
                               in place                                 (attention_block)
    rmsnorm -> [quantise] -> gate_i, up_i rows -> silu(gate_i) * up_i; then the down
                               rows, added into the residual            (mlp_block)

then the final norm and the classifier rows (matvec). Inside a region the threads claim the
first part's work (heads; chunks of gate/up rows) through atomic counters (sync.py) and meet
before the second part, whose rows they split statically: deadlock-free whatever the thread
count (see _qkv_tasks, _mlp_share), and the heads balance where one task per kv head did not
(SmolLM2-135M's 3 kv heads on 2 threads). Each thread quantises the second part's input
(att, act: a few microseconds) into its own scratch; the norms and the first part's input
run on the calling thread between regions. Each weight byte is read once per token. A matrix
is float32 (code -1: `wf`, rows dotted in float32 with reassociation so they vectorise) or
ggml blocks (code >= 0, see quant.QDOT_CODES: `wq`, integer dots against the activation
quantised once per matrix), four rows per call where the rows allow (quant.qdot: one pass
over the activation serves four weight rows), or BitNet's packed ternary T2 rows
(bitnet.T2_CODE: bitnet.t2dot against the activation quantised per token; a BitNet model's
sub-norms run before the out and down rows). A new weight code slots in at _quantize_for,
_row and _rows4. No BLAS is called, so no second thread pool competes with Numba's. Which
thread runs a row never changes its arithmetic: any thread count gives the same bits
(tests/infer/test_decode_threads.py).

The per-thread functions called inside a prange body are inline="always": called as
functions they cost ~4.7 us a layer more on one thread (58M Q4_K_M, measured), the
suspected fixed cost of session 8's one-region step.

Numba's cache keys these kernels on this file alone, with quant's globals (QDOT_BLOCK, the
qdot dispatch) and its intrinsics' code (and sync.py's) compiled in: a new code in
quant.QDOT_CODES (Q5_0 = 4 was the last) or a change to the row dots' code (the last: the
K-quants' scales as vectors) or to sync.py must come with an edit here, or a stale cache
runs the old code (seen: IndexError on code 4).
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


@njit(cache=True, inline="always")
def _swiglu_rows(act, i0, i1, x, wf, wq, codes, a, xd, xs):
    """act[i] = silu(gate_i . x) * (up_i . x) for i in [i0, i1) (i0 a multiple of 4): four
    gate rows, then the same four up rows, at a time. wf / wq / codes are (gate, up) pairs
    (the float rows, the blocks, the codes: the two parts may hold different block types of
    one activation format)."""
    for i in range(i0, i1, 4):
        if i + 4 <= i1:
            g = _rows4(i, i + 1, i + 2, i + 3, x, wf[0], wq[0], codes[0], a, xd, xs)
            u = _rows4(i, i + 1, i + 2, i + 3, x, wf[1], wq[1], codes[1], a, xd, xs)
            for k in range(4):
                act[i + k] = _silu_mul(g[k], u[k])
        else:
            for k in range(i, i1):
                act[k] = _silu_mul(_row(k, x, wf[0], wq[0], codes[0], a, xd, xs),
                                   _row(k, x, wf[1], wq[1], codes[1], a, xd, xs))


MLP_CHUNK = 32   # act rows (64 weight rows) per claimed chunk of the gate/up rows


@njit(cache=True, inline="always")
def _next_chunk(ctr, n, nthreads, i, j):
    """The next gate/up chunk for thread i (n chunks in nthreads contiguous ranges, range r
    claimed through ctr[(1 + r) LINE]): from its own range (j = 0; a line no other thread
    touches until it steals) front to back, then the next ranges'; (chunk, j), chunk = n when
    none is left."""
    while j < nthreads:
        r = (i + j) % nthreads
        c = r * n // nthreads + _add(ctr, (1 + r) * LINE, 1, nthreads)
        if c < (r + 1) * n // nthreads:
            return c, j
        j += 1
    return n, j


@njit(cache=True, inline="always")
def _mlp_share(i, ctr, nthreads, x, act, h, wf, wq, codes, a, xd, xs, sub_norm, eps, wd_f, wd_q, wd_code, buf, bq,
               bd, bs):
    """Thread i's part of mlp_block: gate/up chunks while any are left (ctr[0] counts them
    done, one add a thread), then, once all are done (every chunk is claimed by then, so run
    by a live thread that adds it before it waits), its share of the down rows, group-of-4
    aligned, added into x, against act (or its sub-norm) quantised into its own scratch."""
    H = act.shape[0]
    n = (H + MLP_CHUNK - 1) // MLP_CHUNK
    done = 0
    c, j = _next_chunk(ctr, n, nthreads, i, 0)
    while c < n:
        _swiglu_rows(act, c * MLP_CHUNK, min(c * MLP_CHUNK + MLP_CHUNK, H), h, wf, wq, codes, a, xd, xs)
        done += 1
        c, j = _next_chunk(ctr, n, nthreads, i, j)
    if nthreads > 1:
        fetch_add(ctr, 0, done)
        wait_at_least(ctr, 0, n)
    v = act
    if sub_norm.shape[0]:
        _rmsnorm_row(buf[:H], act, sub_norm, eps)
        v = buf[:H]
    va = bq[:H]
    _quantize_for(wd_code, v, va, bd, bs)
    groups = (x.shape[0] + 3) // 4
    r0, r1 = 4 * (i * groups // nthreads), min(4 * ((i + 1) * groups // nthreads), x.shape[0])
    _rows_into(x, r0, r0, r1, v, wd_f, wd_q, wd_code, va, bd, bs, True)


@njit(parallel=True, cache=True)
def mlp_block(x, act, h, wf, wq, codes, xq, xd, xs, sub_norm, eps, wd_f, wd_q, wd_code, buf, bq, bd, bs, ctr,
              nthreads):
    """x += Wdown . (silu(Wgate . h) * (Wup . h)) (h: x's norm; the product through BitNet's
    sub_norm first where that is not empty) in one parallel region of nthreads threads: the
    gate/up rows in chunks claimed through counters (ctr: zeros, (1 + nthreads) LINE; see
    _mlp_share), then the down rows (one fork/join a layer fewer than a region each). wf /
    wq / codes: the (gate, up) parts; wd_*: the down matrix; act (H,): the product; buf,
    bq, bd, bs: per-thread scratch (nthreads, >= H ...)."""
    a = xq[:h.shape[0]]
    _quantize_for(codes[0], h, a, xd, xs)
    for i in prange(nthreads):
        _mlp_share(i, ctr, nthreads, x, act, h, wf, wq, codes, a, xd, xs, sub_norm, eps, wd_f, wd_q, wd_code, buf[i],
                   bq[i], bd[i], bs[i])


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
def _add(ctr, i, v, nthreads):
    """ctr[i] += v, returning the old value: atomically when threads share the counter, a
    plain add for one thread (no locked instruction on its path)."""
    if nthreads == 1:
        old = ctr[i]
        ctr[i] = old + v
        return old
    return fetch_add(ctr, i, v)


@njit(cache=True, inline="always")
def _qkv_tasks(ctr, nthreads, att, x, wf, wq, codes, a, xd, xs, cache, pos, inv_freq, half, NH, NKV, scores):
    """One thread's share of the heads: claim tasks from ctr[0] until none is left. Tasks
    0 .. 2 NKV - 1 are the k heads then the v heads (rows, RoPE on k), then the q heads
    (rows, RoPE, attention over the cache, which needs every k/v head: ctr[LINE] counts them
    done). A thread adds its k/v heads to ctr[LINE] when it claims its next task, its q heads
    to ctr[2 LINE] when it leaves (one shared-line add each, not one a task). The k/v tasks
    come first, so when a thread waits for them every one is claimed, i.e. run by a live
    thread that waits on nothing before it adds it: the wait ends whatever the thread count
    (iterations run one after another: the first claims every task)."""
    hs = cache.shape[1] // (NH + 2 * NKV)
    group = NH // NKV
    row = cache[pos]
    n = 2 * NKV + NH
    kv, heads = 0, 0
    c = _add(ctr, 0, 1, nthreads)
    while c < n:
        if c < 2 * NKV:
            part, g = 1 + c // NKV, c % NKV
            o = (NH + c) * hs
            _rows_into(row, o, g * hs, (g + 1) * hs, x, wf[part], wq[part], codes[part], a, xd, xs, False)
            if part == 1:   # RoPE in place (it rewrites each pair it reads)
                k = row[o:o + hs]
                _rotate_row(k, k, pos, inv_freq, half, 1.0, 1, hs, False)
            kv += 1
        else:
            h = c - 2 * NKV
            _rows_into(row, h * hs, h * hs, (h + 1) * hs, x, wf[0], wq[0], codes[0], a, xd, xs, False)
            q = row[h * hs:(h + 1) * hs]
            _rotate_row(q, q, pos, inv_freq, half, 1.0, 1, hs, False)
            if heads == 0 and nthreads > 1:
                wait_at_least(ctr, LINE, 2 * NKV)
            g = h // group
            _attend_head(att[h * hs:(h + 1) * hs], cache, pos, h * hs, (NH + g) * hs, (NH + NKV + g) * hs, hs,
                         scores[h])
            heads += 1
        c = _add(ctr, 0, 1, nthreads)
        if kv and c >= 2 * NKV:   # this thread's k/v heads are done, it claimed past them
            _add(ctr, LINE, kv, nthreads)
            kv = 0
    _add(ctr, 2 * LINE, heads, nthreads)


@njit(cache=True, inline="always")
def _attention_out(i, ctr, nthreads, x, att, h, wf, wq, codes, a, xd, xs, cache, pos, inv_freq, half, NH, NKV,
                   scores, sub_norm, eps, wo_f, wo_q, wo_code, buf, bq, bd, bs):
    """Thread i's part of attention_block: its qkv tasks, then (once every head's attention
    is done: the heads are all claimed by then, so being run by live threads) its share of
    the out rows, group-of-4 aligned, added into the residual x, against att (or its
    sub-norm) quantised into the thread's own scratch (buf, bq, bd, bs)."""
    _qkv_tasks(ctr, nthreads, att, h, wf, wq, codes, a, xd, xs, cache, pos, inv_freq, half, NH, NKV, scores)
    if nthreads > 1:
        wait_at_least(ctr, 2 * LINE, NH)
    v = att
    if sub_norm.shape[0]:
        _rmsnorm_row(buf[:att.shape[0]], att, sub_norm, eps)
        v = buf[:att.shape[0]]
    va = bq[:v.shape[0]]
    _quantize_for(wo_code, v, va, bd, bs)
    groups = (x.shape[0] + 3) // 4
    r0, r1 = 4 * (i * groups // nthreads), min(4 * ((i + 1) * groups // nthreads), x.shape[0])
    _rows_into(x, r0, r0, r1, v, wo_f, wo_q, wo_code, va, bd, bs, True)


@njit(parallel=True, cache=True)
def attention_block(x, att, h, wf, wq, codes, xq, xd, xs, cache, pos, inv_freq, half, NH, NKV, scores, sub_norm, eps,
                    wo_f, wo_q, wo_code, buf, bq, bd, bs, ctr, nthreads):
    """Attention for position pos, added into the residual x: the rows of W . h (h: x's
    norm) for every q, k and v head, written to cache[pos] (layout q | k | v heads), RoPE on
    q and k, each query head's attention over cache[0..pos] into att (NH*hs,), then x +=
    Wo . att (att through BitNet's sub_norm first where that is not empty). wf / wq / codes:
    the (q, k, v) parts of W (float rows, blocks, codes; one activation format); wo_*: the
    out matrix. nthreads threads share the heads through counters (ctr: zeros, 3 LINE; see
    _qkv_tasks) rather than one task per kv head (SmolLM2-135M's 3 kv heads split 2:1 over
    2 threads), and the out rows run in the same parallel region (one fork/join a layer
    fewer). buf, bq, bd, bs: per-thread scratch (nthreads, NH*hs ...)."""
    a = xq[:h.shape[0]]
    _quantize_for(codes[0], h, a, xd, xs)
    for i in prange(nthreads):
        _attention_out(i, ctr, nthreads, x, att, h, wf, wq, codes, a, xd, xs, cache, pos, inv_freq, half, NH, NKV,
                       scores, sub_norm, eps, wo_f, wo_q, wo_code, buf[i], bq[i], bd[i], bs[i])


@njit(cache=True, inline="always")
def _part(flat, t, n):
    """The n rows of one part of a kept matrix: t = (byte offset in flat, code, bytes per
    row); a float matrix's parts are (0, -1, 0): empty."""
    return flat[t[0]:t[0] + n * t[2]].reshape((n, t[2]))


@njit(cache=True)
def llama_decode_step(logits, token, pos, wte, attn_norm, ffn_norm, norm_f, attn_sub_norm, ffn_sub_norm, wf, wq,
                      parts, head_f, head_q, head_code, cache, inv_freq, half, NH, NKV, H, eps, nthreads):
    """The logits (rows of the classifier) after token `token` at position `pos`, whose
    rotated qkv rows are appended to cache (L, capacity, W) at row pos, by `nthreads` (>= 1:
    numba.get_num_threads(), an argument so the kernel caches; any count gives the same bits).

    wf: the four per-layer matrices (qkv, out, gate_up, down) as float32 (L, OC, C) arrays,
    an (L, 0, 0) one where a matrix is kept as blocks; wq: their blocks, each one flat uint8
    array, layer after layer, part after part (q, k, v; gate, up); parts (4, L, 3, 3): per
    matrix, layer and part (byte offset in wq, block code, bytes per row), code -1 for float,
    so a layer may mix block types (a Q4_K_M file's Q4_K q/k and Q6_K v rows). head_code:
    the classifier's (-1 float: head_f, else head_q). H: the MLP's width. attn_sub_norm (L,
    NH*hs) / ffn_sub_norm (L, H): BitNet's RMSNorms before the out / down projections, or (L, 0)."""
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
    ctr = np.zeros((L, 2, (3 + nthreads) * LINE), np.int64)   # attention_block's and mlp_block's counters
    buf = np.empty((nthreads, width), np.float32)   # the blocks' per-thread scratch
    bq = np.empty((nthreads, width), np.int8)
    bd = np.empty((nthreads, width // QK + 1), np.float32)
    bs = np.empty((nthreads, width // QK), np.int32)
    for l in range(L):
        t, f, o = parts[0, l], wf[0][l], parts[1, l]
        _rmsnorm_row(h, x, attn_norm[l], eps)
        attention_block(x, att, h, (f[:q1], f[q1:k1], f[k1:]),
                        (_part(wq[0], t[0], q1), _part(wq[0], t[1], k1 - q1), _part(wq[0], t[2], W - k1)),
                        (t[0, 1], t[1, 1], t[2, 1]), xq, xd, xs, cache[l], pos, inv_freq, half, NH, NKV, scores,
                        attn_sub_norm[l], eps, wf[1][l], _part(wq[1], o[0], C), o[0, 1], buf, bq, bd, bs, ctr[l, 0],
                        nthreads)
        _rmsnorm_row(h, x, ffn_norm[l], eps)
        t, f, d = parts[2, l], wf[2][l], parts[3, l]
        mlp_block(x, act, h, (f[:H], f[H:]), (_part(wq[2], t[0], H), _part(wq[2], t[1], H)), (t[0, 1], t[1, 1]),
                  xq, xd, xs, ffn_sub_norm[l], eps, wf[3][l], _part(wq[3], d[0], C), d[0, 1], buf, bq, bd, bs,
                  ctr[l, 1], nthreads)
    _rmsnorm_row(h, x, norm_f, eps)
    matvec(logits, h, head_f, head_q, head_code, xq, xd, xs, False)

