"""Token (+ learned position) embedding: out[b, t] = wte[ids[b, t]] + wpe[pos0 + t]."""
from numba import njit, prange

COL_BLOCK = 64


@njit(parallel=True, cache=True)
def embedding_forward(out, ids, wte, wpe, pos0):
    """out (B, T, C); ids (B, T) int32 in [0, V); wpe (maxT, C) or empty (no positions)."""
    B, T = ids.shape
    has_pos = wpe.shape[0] > 0
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        o = out[b, t]
        o[:] = wte[ids[b, t]]
        if has_pos:
            o += wpe[pos0 + t]


@njit(parallel=True, cache=True)
def embedding_backward(dwte, dwpe, dout, ids, pos0):
    """Accumulate dwte[ids[b, t]] += dout[b, t] and dwpe[pos0 + t] += dout[b, t].

    Several positions can hold the same token id, so tasks split the channel axis
    instead of the positions: each owns a block of columns of every row, no races.
    """
    B, T = ids.shape
    C = dout.shape[2]
    has_tok = dwte.shape[0] > 0  # empty: the token table is frozen
    has_pos = dwpe.shape[0] > 0
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        c1 = min(c0 + COL_BLOCK, C)
        for b in range(B):
            for t in range(T):
                if has_tok:
                    row = dwte[ids[b, t]]
                    for c in range(c0, c1):
                        row[c] += dout[b, t, c]
                if has_pos:
                    prow = dwpe[pos0 + t]
                    for c in range(c0, c1):
                        prow[c] += dout[b, t, c]
