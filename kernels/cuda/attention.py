"""Self-attention over a fused qkv buffer, grouped-query aware, causal or bidirectional
(see the CPU twin for the meaning of the arguments).

qkv is (B, T, (NH + 2*NKV) * hs); query head h reads key/value head h // (NH // NKV);
window > 0 limits each query to the last `window` keys. With q0 > 0 only positions
q0..T-1 are queries (the rows before are a KV cache); out and lse hold those T - q0 rows.
causal=False: every query sees every key 0..T-1 (no window then; nt.ops refuses one).

Flash attention, tiled for the GPU. Every kernel runs THREADS-thread blocks in which
`lanes` threads share a row (lanes_for(hs): 8 at head size 64, 16 at 128, 32 at 256), lane
c holding the row's elements c, c + lanes, c + 2*lanes, ... in registers (at most NACC).
A forward block owns THREADS / lanes consecutive query rows of one head and walks the
keys they can see in tiles of KT keys loaded into shared memory together (coalesced:
consecutive threads read consecutive columns), so a key row is read from global memory
once per block, not once per query. Per tile, every lane computes its share of its row's
KT dot products and the row's lanes sum them (register shuffles on a GPU; through shared
memory under the simulator, which has no shuffles), so every lane holds the tile's
scores; each runs the online softmax (running max m, running sum l) and updates its
slice of the output. The row's log-sum-exp m + log(l) is saved for the backward. No
T x T matrix exists, no array lives in local memory, and all math is in the inputs'
dtype: float32 when training, float64 only when a float64 test asks for it.

Decoding one token (T - q0 == 1) has one query per (batch, head) and many keys, so it
parallelises over keys instead (split-K): each block takes a run of keys, each of its
rows a strided share of them with its own (m, l, output) state, and writes those partial
states; a second kernel merges them per (batch, head).

The backward first computes D = rowsum(dout * out) once per query row (its own small
pass), then recomputes the probabilities from the saved lse tile by tile in two
kernels, so every grad element has a single owner and the result does not depend on
scheduling (no atomics): query blocks accumulate dq over key tiles; key blocks
accumulate dk and dv over tiles of the queries (of every head in their group) that see
them.

Budgets (GPU sizes; tests/cuda/ptx_check.py --resources checks them): static shared
memory is the two tiles, 16 KB per block in float32 and 32 KB in float64 (under the
48 KB static limit); 56-164 registers per thread in float32 on sm_80/sm_90, no stack
frame, no spills (docs/cuda.md, "Attention").
"""
import math

import numpy as np
from numba import cuda
from numba.cuda.core import config

from .launch import MAX_BLOCKS

# Read inside the kernels, so defined here and not imported: Numba's cache keys on this
# file, and a kernel would keep a stale copy of another file's constant after an edit.
SIMULATOR = bool(config.ENABLE_CUDASIM)

HS_MAX = 256                            # largest head size (Gemma 3 uses 256)
THREADS = 16 if SIMULATOR else 128      # threads per block, every attention kernel
NACC = 4 if SIMULATOR else 8            # row elements per thread at most, kept in registers
KT = 4 if SIMULATOR else 8              # keys (or, in dk/dv, queries) per shared tile
MIN_LANES = 2 if SIMULATOR else 4       # a block holds at most THREADS / MIN_LANES rows
MAX_LANES = min(32, THREADS)            # a row never spans more than a warp
MAX_ROWS = THREADS // MIN_LANES
SHARE = KT * (THREADS + MAX_ROWS)       # simulator only: [row, key, lane + 1 pad] shares of dots
ROW_SHARE = THREADS + MAX_ROWS          # simulator only: [row, lane + 1 pad]
DECODE_BLOCKS = 64 if SIMULATOR else 264  # decode blocks to aim for (2 per SM on an H100)


def lanes_for(hs: int) -> int:
    """Threads per row for head size hs: the smallest power of two (at least MIN_LANES)
    that leaves each thread at most NACC of the row's elements. A block holds
    THREADS // lanes rows: 16 at hs = 64, 8 at 128, 4 at 256 on a GPU."""
    lanes = MIN_LANES
    while lanes * NACC < hs:
        lanes *= 2
    return lanes


# ----------------------------------------------------------------------------- per-lane row slices
# Lane c of a row holds the row's elements c, c + lanes, c + 2*lanes, ... (at most NACC):
# consecutive lanes touch consecutive columns, so loads coalesce and shared reads do not
# conflict. The loops run over the constant NACC and are unrolled, so the slices live in
# registers, not local memory. Shared tiles are read through a row view with uint32
# columns: Numba wraps negative signed indices, and that per-element fix-up (hoisted for
# every unrolled column) cost about 15 registers.

@cuda.jit(device=True, cache=True)
def _load_slice(x, src, b, t, col, hs, lanes, c, s):
    """x[i] = src[b, t, col + c + i*lanes] * s (zero past hs)."""
    for i in range(NACC):
        k = c + i * lanes
        if k < hs:
            x[i] = src[b, t, col + k] * s
        else:
            x[i] = 0


@cuda.jit(device=True, cache=True)
def _dot_slice(x, tile, j, hs, lanes, c):
    """This lane's share of x . tile[j, :hs]."""
    s = x.dtype.type(0)
    row = tile[j]
    for i in range(NACC):
        k = np.uint32(c + i * lanes)
        if k < np.uint32(hs):
            s += x[i] * row[k]
    return s


@cuda.jit(device=True, cache=True)
def _axpy_slice(x, a, tile, j, hs, lanes, c):
    """x += a * tile[j, :hs] on this lane's columns."""
    row = tile[j]
    for i in range(NACC):
        k = np.uint32(c + i * lanes)
        if k < np.uint32(hs):
            x[i] += a * row[k]


@cuda.jit(device=True, cache=True)
def _scale_slice(x, a):
    """x *= a."""
    for i in range(NACC):
        x[i] *= a


@cuda.jit(device=True, cache=True)
def _zero_slice(x):
    """x = 0 (not x *= 0: x starts as whatever the registers held, NaN included)."""
    for i in range(NACC):
        x[i] = 0


@cuda.jit(device=True, cache=True)
def _store_slice(dst, b, t, col, x, s, hs, lanes, c, add):
    """dst[b, t, col + this lane's columns] = x * s, or += when add."""
    for i in range(NACC):
        k = c + i * lanes
        if k < hs:
            if add:
                dst[b, t, col + k] += x[i] * s
            else:
                dst[b, t, col + k] = x[i] * s


@cuda.jit(device=True, cache=True)
def _load_tile(dst, src, b, row0, n, col, hs):
    """The block copies src[b, row0:row0+n, col:col+hs] into dst[:n, :hs], thread t taking
    elements t, t + blockDim, ... of it (consecutive threads, consecutive columns). The
    (row, column) of the next element is stepped, not divided out each time: an integer
    division is some twenty instructions on a GPU."""
    i = cuda.threadIdx.x // hs
    k = cuda.threadIdx.x % hs
    di = cuda.blockDim.x // hs
    dk = cuda.blockDim.x % hs
    while i < n:
        dst[i, k] = src[b, row0 + i, col + k]
        i += di
        k += dk
        if k >= hs:
            k -= hs
            i += 1


@cuda.jit(device=True, cache=True)
def _share_sum(part, at, lanes):
    """The sum of the lanes' shares part[at:at + lanes]."""
    s = part[at]
    for c in range(1, lanes):
        s += part[at + c]
    return s


@cuda.jit(device=True, cache=True)
def _lane_sum(s, part, r, c, lanes):
    """The sum of s over the lanes of row r, returned to each of them; every thread of
    the block calls it. On a GPU a butterfly of register shuffles inside the warp (a row's
    lanes are consecutive and a power of two; a + b = b + a, so every lane gets the same
    bits); under the simulator, which has no shuffles, through part[row, lane + 1 pad]
    and two barriers."""
    if SIMULATOR:
        part[r * (lanes + 1) + c] = s
        cuda.syncthreads()
        s = _share_sum(part, r * (lanes + 1), lanes)
        cuda.syncthreads()
    else:
        step = 1
        while step < lanes:
            s += cuda.shfl_xor_sync(0xFFFFFFFF, s, step)
            step *= 2
    return s


@cuda.jit(device=True, cache=True)
def _row_dots(d, x, tile, n, hs, part, r, c, lanes):
    """d[j] = x . tile[j, :hs] for j < n (d[j] = 0 for n <= j < KT) in every lane of row r,
    x being the row's slices; every thread of the block calls it. On a GPU a lane sum per
    key; under the simulator all keys' shares go through part[row, key, lane + 1] at once
    (two barriers per tile, not per key)."""
    if SIMULATOR:
        for j in range(n):
            part[(r * KT + j) * (lanes + 1) + c] = _dot_slice(x, tile, j, hs, lanes, c)
        cuda.syncthreads()
        for j in range(KT):
            d[j] = 0
            if j < n:
                d[j] = _share_sum(part, (r * KT + j) * (lanes + 1), lanes)
        cuda.syncthreads()
    else:
        for j in range(KT):
            d[j] = 0
            if j < n:  # the same n in every thread: all lanes reach the shuffles
                d[j] = _lane_sum(_dot_slice(x, tile, j, hs, lanes, c), part, r, c, lanes)


@cuda.jit(device=True, cache=True)
def _visible(t, j, window, causal):
    """Query position t may attend key position j."""
    return (window == 0 or j > t - window) and (not causal or j <= t)


# ----------------------------------------------------------------------------- forward

@cuda.jit(cache=True)
def _attention_forward(out, lse, qkv, NH, NKV, window, q0, causal, lanes):
    """A block owns `rows` query rows of one head and walks their keys in shared tiles."""
    B, T, _ = qkv.shape
    hs = out.shape[2] // NH
    f = qkv.dtype.type
    scale = f(1.0) / math.sqrt(f(hs))
    ninf = f(-math.inf)
    ks = cuda.shared.array((KT, HS_MAX), qkv.dtype)
    vs = cuda.shared.array((KT, HS_MAX), qkv.dtype)
    part = cuda.shared.array(SHARE, qkv.dtype)     # simulator only: per-lane shares of dots
    q = cuda.local.array(NACC, qkv.dtype)
    acc = cuda.local.array(NACC, qkv.dtype)
    s = cuda.local.array(KT, qkv.dtype)            # the tile's scores, in every lane of the row
    rows = cuda.blockDim.x // lanes
    r = cuda.threadIdx.x // lanes
    c = cuda.threadIdx.x % lanes
    n_qblk = (T - q0 + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NH * n_qblk, cuda.gridDim.x):
        # the block's query positions first..last; the block index varies slowest and the
        # last blocks (the most keys when causal) go first, so short ones fill the tail
        b = task // NH % B
        h = task % NH
        first = q0 + (n_qblk - 1 - task // (B * NH)) * rows
        last = min(T, first + rows) - 1
        t = first + r
        live = t <= last
        qo = h * hs
        ko = (NH + h // (NH // NKV)) * hs
        vo = ko + NKV * hs
        _load_slice(q, qkv, b, min(t, last), qo, hs, lanes, c, scale)  # rows past the end compute harmlessly
        _zero_slice(acc)
        m = ninf
        l = f(0)
        j_lo = max(0, first - window + 1) if window > 0 else 0
        j_end = last + 1 if causal else T      # one past the block's last visible key
        for j0 in range(j_lo, j_end, KT):
            n = min(KT, j_end - j0)
            _load_tile(ks, qkv, b, j0, n, ko, hs)
            _load_tile(vs, qkv, b, j0, n, vo, hs)
            cuda.syncthreads()
            _row_dots(s, q, ks, n, hs, part, r, c, lanes)
            m_tile = ninf
            for j in range(KT):
                if j < n and live and _visible(t, j0 + j, window, causal):
                    m_tile = max(m_tile, s[j])
                else:
                    s[j] = ninf
            if m_tile > ninf:                  # the row sees a key of this tile
                m_new = max(m, m_tile)
                correction = math.exp(m - m_new)
                l *= correction
                _scale_slice(acc, correction)
                for j in range(KT):
                    if j < n:
                        p = math.exp(s[j] - m_new)
                        l += p
                        _axpy_slice(acc, p, vs, j, hs, lanes, c)
                m = m_new
            cuda.syncthreads()                 # everyone is done with the tile before the next load
        if live:
            _store_slice(out, b, t - q0, qo, acc, f(1) / l, hs, lanes, c, False)
            if c == 0:
                lse[b, h, t - q0] = m + math.log(l)


@cuda.jit(cache=True)
def _attention_decode(parts, qkv, NH, NKV, window, lanes, split_len):
    """One query (position T-1) per (b, h). Block (b, h, split) takes split_len keys
    from j_lo + split*split_len on; its row r walks every rows-th of them with its own
    online softmax and writes its unnormalised output, max and sum to
    parts[b, h, split*rows + r]."""
    B, T, _ = qkv.shape
    hs = parts.shape[3] - 2
    f = qkv.dtype.type
    scale = f(1.0) / math.sqrt(f(hs))
    part = cuda.shared.array(ROW_SHARE, qkv.dtype)  # simulator only: [row, lane] shares
    q = cuda.local.array(NACC, qkv.dtype)
    acc = cuda.local.array(NACC, qkv.dtype)
    rows = cuda.blockDim.x // lanes
    r = cuda.threadIdx.x // lanes
    c = cuda.threadIdx.x % lanes
    j_lo = max(0, T - window) if window > 0 else 0
    n_split = parts.shape[2] // rows
    for task in range(cuda.blockIdx.x, B * NH * n_split, cuda.gridDim.x):
        b = task // (NH * n_split)
        h = task // n_split % NH
        split = task % n_split
        ko = (NH + h // (NH // NKV)) * hs
        vo = ko + NKV * hs
        start = j_lo + split * split_len
        stop = min(T, start + split_len)
        _load_slice(q, qkv, b, T - 1, h * hs, hs, lanes, c, scale)
        _zero_slice(acc)
        m = f(-math.inf)
        l = f(0)
        for j0 in range(start, stop, rows):
            j = j0 + r
            live = j < stop
            key = qkv[b, min(j, stop - 1)]     # rows past the end hold a real row, use nothing
            s = f(0)                           # this lane's share of q . k_j, each key read once
            if live:
                for i in range(NACC):
                    k = c + i * lanes
                    if k < hs:
                        s += q[i] * key[np.uint32(ko + k)]
            s = _lane_sum(s, part, r, c, lanes)
            if live:
                if s > m:                      # new running max: rescale what is accumulated
                    correction = math.exp(m - s)
                    l *= correction
                    _scale_slice(acc, correction)
                    m = s
                p = math.exp(s - m)
                l += p
                for i in range(NACC):
                    k = c + i * lanes
                    if k < hs:
                        acc[i] += p * key[np.uint32(vo + k)]
        row = split * rows + r
        for i in range(NACC):
            k = c + i * lanes
            if k < hs:
                parts[b, h, row, k] = acc[i]
        if c == 0:
            parts[b, h, row, hs] = m
            parts[b, h, row, hs + 1] = l


@cuda.jit(cache=True)
def _decode_combine(out, lse, parts):
    """Merge the partial softmax states parts[b, h, :] into out[b, 0, h] and lse[b, h, 0].
    Each state's weight exp(m - M) is computed once and written over its m (parts is
    scratch), not once per column."""
    B, NH, P, width = parts.shape
    hs = width - 2
    f = parts.dtype.type
    for task in range(cuda.blockIdx.x, B * NH, cuda.gridDim.x):
        b = task // NH
        h = task % NH
        M = f(-math.inf)
        for p in range(P):
            M = max(M, parts[b, h, p, hs])
        cuda.syncthreads()                     # every thread has its M before the m's are replaced
        for p in range(cuda.threadIdx.x, P, cuda.blockDim.x):
            parts[b, h, p, hs] = math.exp(parts[b, h, p, hs] - M)  # no keys: m = -inf, weight 0
        cuda.syncthreads()
        L = f(0)
        for p in range(P):
            L += parts[b, h, p, hs + 1] * parts[b, h, p, hs]
        for k in range(cuda.threadIdx.x, hs, cuda.blockDim.x):
            o = f(0)
            for p in range(P):
                o += parts[b, h, p, k] * parts[b, h, p, hs]
            out[b, 0, h * hs + k] = o / L
        if cuda.threadIdx.x == 0:
            lse[b, h, 0] = M + math.log(L)


# ----------------------------------------------------------------------------- backward

@cuda.jit(cache=True)
def _attention_backward_d(D, dout, out, NH, lanes):
    """D[b, h, t] = dout[b, t, h] . out[b, t, h], the softmax backward's per-row term."""
    B, Tq, _ = out.shape
    hs = out.shape[2] // NH
    part = cuda.shared.array(ROW_SHARE, out.dtype)  # simulator only: [row, lane] shares
    rows = cuda.blockDim.x // lanes
    r = cuda.threadIdx.x // lanes
    c = cuda.threadIdx.x % lanes
    n_blk = (Tq + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NH * n_blk, cuda.gridDim.x):
        b = task // (NH * n_blk)
        h = task // n_blk % NH
        t = task % n_blk * rows + r
        s = out.dtype.type(0)
        if t < Tq:
            for k in range(c, hs, lanes):
                s += dout[b, t, h * hs + k] * out[b, t, h * hs + k]
        s = _lane_sum(s, part, r, c, lanes)
        if c == 0 and t < Tq:
            D[b, h, t] = s


@cuda.jit(cache=True)
def _attention_backward_q(dqkv, dout, qkv, lse, D, NH, NKV, window, q0, causal, lanes):
    """dq: a block of query rows of one head, over shared tiles of their keys and values."""
    B, T, _ = qkv.shape
    hs = dout.shape[2] // NH
    f = qkv.dtype.type
    scale = f(1.0) / math.sqrt(f(hs))
    ks = cuda.shared.array((KT, HS_MAX), qkv.dtype)
    vs = cuda.shared.array((KT, HS_MAX), qkv.dtype)
    part = cuda.shared.array(SHARE, qkv.dtype)    # simulator only: per-lane shares of dots
    q = cuda.local.array(NACC, qkv.dtype)
    do = cuda.local.array(NACC, qkv.dtype)
    dq = cuda.local.array(NACC, qkv.dtype)
    s = cuda.local.array(KT, qkv.dtype)           # q . k of the tile's keys
    dp = cuda.local.array(KT, qkv.dtype)          # do . v
    rows = cuda.blockDim.x // lanes
    r = cuda.threadIdx.x // lanes
    c = cuda.threadIdx.x % lanes
    n_qblk = (T - q0 + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NH * n_qblk, cuda.gridDim.x):
        b = task // NH % B
        h = task % NH
        first = q0 + (n_qblk - 1 - task // (B * NH)) * rows  # the longest first, as in the forward
        last = min(T, first + rows) - 1
        t = first + r
        live = t <= last
        tl = min(t, last)                      # rows past the end work on a real row, write nothing
        qo = h * hs
        ko = (NH + h // (NH // NKV)) * hs
        vo = ko + NKV * hs
        _load_slice(q, qkv, b, tl, qo, hs, lanes, c, scale)
        _load_slice(do, dout, b, tl - q0, qo, hs, lanes, c, f(1))
        _zero_slice(dq)
        L = lse[b, h, tl - q0]
        Dt = D[b, h, tl - q0]
        j_lo = max(0, first - window + 1) if window > 0 else 0
        j_end = last + 1 if causal else T
        for j0 in range(j_lo, j_end, KT):
            n = min(KT, j_end - j0)
            _load_tile(ks, qkv, b, j0, n, ko, hs)
            _load_tile(vs, qkv, b, j0, n, vo, hs)
            cuda.syncthreads()
            _row_dots(s, q, ks, n, hs, part, r, c, lanes)
            _row_dots(dp, do, vs, n, hs, part, r, c, lanes)
            for j in range(KT):
                if j < n and live and _visible(t, j0 + j, window, causal):
                    p = math.exp(s[j] - L)     # ds = p (dp - D) / sqrt(hs)
                    _axpy_slice(dq, p * (dp[j] - Dt) * scale, ks, j, hs, lanes, c)
            cuda.syncthreads()
        if live:
            _store_slice(dqkv, b, t, qo, dq, f(1), hs, lanes, c, True)


@cuda.jit(cache=True)
def _attention_backward_kv(dqkv, dout, qkv, lse, D, NH, NKV, window, q0, causal, lanes):
    """dk and dv: a block of key rows of one kv head, over shared tiles of the query rows
    (of every head in the group) that see them. One block owns each key row: no atomics."""
    B, T, _ = qkv.shape
    hs = dout.shape[2] // NH
    group = NH // NKV
    f = qkv.dtype.type
    scale = f(1.0) / math.sqrt(f(hs))
    qs = cuda.shared.array((KT, HS_MAX), qkv.dtype)
    dos = cuda.shared.array((KT, HS_MAX), qkv.dtype)
    Ls = cuda.shared.array(KT, qkv.dtype)
    Ds = cuda.shared.array(KT, qkv.dtype)
    part = cuda.shared.array(SHARE, qkv.dtype)    # simulator only: per-lane shares of dots
    k = cuda.local.array(NACC, qkv.dtype)
    v = cuda.local.array(NACC, qkv.dtype)
    dk = cuda.local.array(NACC, qkv.dtype)
    dv = cuda.local.array(NACC, qkv.dtype)
    s = cuda.local.array(KT, qkv.dtype)           # k . q of the tile's queries
    dp = cuda.local.array(KT, qkv.dtype)          # v . do
    rows = cuda.blockDim.x // lanes
    r = cuda.threadIdx.x // lanes
    c = cuda.threadIdx.x % lanes
    n_kblk = (T + rows - 1) // rows
    for task in range(cuda.blockIdx.x, B * NKV * n_kblk, cuda.gridDim.x):
        b = task // NKV % B
        kv = task % NKV
        first = task // (B * NKV) * rows       # key positions first..last; early keys (most queries) first
        last = min(T, first + rows) - 1
        j = first + r
        live = j <= last
        ko = (NH + kv) * hs
        vo = ko + NKV * hs
        _load_slice(k, qkv, b, min(j, last), ko, hs, lanes, c, scale)
        _load_slice(v, qkv, b, min(j, last), vo, hs, lanes, c, f(1))
        _zero_slice(dk)
        _zero_slice(dv)
        t_lo = max(first, q0) if causal else q0  # queries t_lo..t_hi see some key of the block
        t_hi = min(T, last + window) - 1 if window > 0 else T - 1
        for h in range(kv * group, (kv + 1) * group):
            qo = h * hs
            for t0 in range(t_lo, t_hi + 1, KT):
                n = min(KT, t_hi + 1 - t0)
                _load_tile(qs, qkv, b, t0, n, qo, hs)
                _load_tile(dos, dout, b, t0 - q0, n, qo, hs)
                if cuda.threadIdx.x < n:
                    Ls[cuda.threadIdx.x] = lse[b, h, t0 + cuda.threadIdx.x - q0]
                    Ds[cuda.threadIdx.x] = D[b, h, t0 + cuda.threadIdx.x - q0]
                cuda.syncthreads()
                _row_dots(s, k, qs, n, hs, part, r, c, lanes)
                _row_dots(dp, v, dos, n, hs, part, r, c, lanes)
                for i in range(KT):
                    if i < n and live and _visible(t0 + i, j, window, causal):
                        p = math.exp(s[i] - Ls[i])
                        _axpy_slice(dv, p, dos, i, hs, lanes, c)
                        _axpy_slice(dk, p * (dp[i] - Ds[i]), qs, i, hs, lanes, c)
                cuda.syncthreads()
        if live:
            _store_slice(dqkv, b, j, ko, dk, scale, hs, lanes, c, True)
            _store_slice(dqkv, b, j, vo, dv, f(1), hs, lanes, c, True)


# ----------------------------------------------------------------------------- Python side

_scratch = {}


def _scratch_array(shape, dtype):
    """A device array of `shape` for per-call intermediates (the backward's D, the decode's
    partial states). ops.attention sizes `work` from T alone, too little to hold them, so
    they live here: one buffer per dtype, grown when a call needs more and reused after, so
    steady-state steps allocate nothing."""
    n = int(np.prod(shape))
    buf = _scratch.get(np.dtype(dtype))
    if buf is None or buf.size < n:
        buf = _scratch[np.dtype(dtype)] = cuda.device_array(max(n, 1), dtype)
    return buf[:n].reshape(shape)


def attention_work_shape(T: int) -> tuple:
    """No scratch from the caller: tiles live in shared memory, row state in registers,
    the backward's D and the decode's partial states in a reused module buffer."""
    return (0, 0)


def _grid(n_tasks: int) -> int:
    return max(1, min(MAX_BLOCKS, n_tasks))


def _head_size(out, NH) -> int:
    hs = out.shape[2] // NH
    if hs > min(HS_MAX, NACC * MAX_LANES):
        raise ValueError(f"CUDA attention supports head sizes up to {min(HS_MAX, NACC * MAX_LANES)}, got {hs}")
    return hs


def attention_forward(out, lse, qkv, work, NH, NKV, window, q0, causal=True):
    """out (B, T-q0, NH*hs) = softmax(q k^T / sqrt(hs), causal mask if causal) v; lse (B, NH, T-q0).
    work is unused (see attention_work_shape). One query row per (b, h), decoding with a
    KV cache, takes the split-K path."""
    hs = _head_size(out, NH)
    lanes = lanes_for(hs)
    rows = THREADS // lanes
    B, T, _ = qkv.shape
    window, q0 = int(window), int(q0)
    if T - q0 == 1:  # its one query sees keys max(0, T-window)..T-1, causal or not
        n_keys = min(T, window) if window > 0 else T
        # enough splits to fill the GPU, each at least one key per row
        want = max(1, DECODE_BLOCKS // (B * NH))
        split_len = -(-max(rows, -(-n_keys // want)) // rows) * rows
        n_split = -(-n_keys // split_len)
        parts = _scratch_array((B, NH, n_split * rows, hs + 2), qkv.dtype)
        _attention_decode[_grid(B * NH * n_split), THREADS](parts, qkv, NH, NKV, window, lanes, split_len)
        _decode_combine[_grid(B * NH), THREADS](out, lse, parts)
        return
    n_qblk = (T - q0 + rows - 1) // rows
    _attention_forward[_grid(B * NH * n_qblk), THREADS](out, lse, qkv, NH, NKV, window, q0, bool(causal), lanes)


def attention_backward(dqkv, dout, qkv, out, lse, work, NH, NKV, window, q0, causal=True):
    """Accumulate dqkv from dout: D = rowsum(dout * out), then dq, then dk and dv."""
    hs = _head_size(out, NH)
    lanes = lanes_for(hs)
    rows = THREADS // lanes
    B, T, _ = qkv.shape
    Tq = T - int(q0)
    D = _scratch_array((B, NH, Tq), qkv.dtype)
    q_blocks = _grid(B * NH * ((Tq + rows - 1) // rows))
    _attention_backward_d[q_blocks, THREADS](D, dout, out, NH, lanes)
    args = (dqkv, dout, qkv, lse, D, NH, NKV, int(window), int(q0), bool(causal), lanes)
    _attention_backward_q[q_blocks, THREADS](*args)
    _attention_backward_kv[_grid(B * NKV * ((T + rows - 1) // rows)), THREADS](*args)
