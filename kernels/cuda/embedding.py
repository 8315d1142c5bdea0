"""Token (+ learned position) embedding: out[b, t] = wte[ids[b, t]] + wpe[pos0 + t]."""
from numba import cuda

from .launch import THREADS, blocks
from .memory import ids_to_device


@cuda.jit(cache=True)
def _embedding_forward(out, ids, wte, wpe, pos0):
    B, T, C = out.shape
    has_pos = wpe.shape[0] > 0
    for i in range(cuda.grid(1), B * T * C, cuda.gridsize(1)):
        b = i // (T * C)
        t = i // C % T
        c = i % C
        x = wte[ids[b, t], c]
        if has_pos:
            x += wpe[pos0 + t, c]
        out[b, t, c] = x


@cuda.jit(cache=True)
def _embedding_backward_tokens(dwte, dout, ids):
    """dwte[ids[b, t], c] += dout[b, t, c] with atomics: ids repeat arbitrarily, and giving
    each row of dwte a single writer would serialise all positions of a frequent token."""
    B, T, C = dout.shape
    for i in range(cuda.grid(1), B * T * C, cuda.gridsize(1)):
        b = i // (T * C)
        t = i // C % T
        c = i % C
        cuda.atomic.add(dwte, (ids[b, t], c), dout[b, t, c])


@cuda.jit(cache=True)
def _embedding_backward_positions(dwpe, dout, pos0):
    """dwpe[pos0 + t, c] += sum_b dout[b, t, c]: one thread per (t, c), a single writer."""
    B, T, C = dout.shape
    for i in range(cuda.grid(1), T * C, cuda.gridsize(1)):
        t = i // C
        c = i % C
        s = dout.dtype.type(0)
        for b in range(B):
            s += dout[b, t, c]
        dwpe[pos0 + t, c] += s


def embedding_forward(out, ids, wte, wpe, pos0):
    """out (B, T, C); ids (B, T) int32 in [0, V); wpe (maxT, C) or empty (no positions)."""
    _embedding_forward[blocks(out.size), THREADS](out, ids_to_device(ids), wte, wpe, pos0)


def embedding_backward(dwte, dwpe, dout, ids, pos0):
    """Accumulate dwte[ids[b, t]] += dout[b, t] and dwpe[pos0 + t] += dout[b, t].

    Token grads use atomics (summation order varies run to run in the last bits);
    position grads have one writer per element.
    """
    B, T, C = dout.shape
    if dwte.shape[0] > 0:  # empty: the token table is frozen
        _embedding_backward_tokens[blocks(dout.size), THREADS](dwte, dout, ids_to_device(ids))
    if dwpe.shape[0] > 0:
        _embedding_backward_positions[blocks(T * C), THREADS](dwpe, dout, pos0)
