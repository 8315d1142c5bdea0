"""Deterministic two-stage column reductions: out[c] += sum over rows n of term(n, c).

Weight and bias grads (matmul bias, layernorm, rmsnorm, QK-norm weights) sum a term over
all N = B*T rows for each of C columns. One thread per column walking all rows gives
C / THREADS blocks (3 for C = 768 on a 132-SM GPU). Instead, as llm.c does for its bias
grads, the rows are cut into chunks: stage 1 (one kernel per op, since each op's term
differs) has a block per (row chunk, column tile), each thread summing its column over
the chunk's rows (adjacent threads read adjacent columns: coalesced) into
partial[chunk, c]; stage 2 (`sum_partials`, shared by all) adds the chunks of each column
in chunk order. The chunking depends only on N, so the summation order, and the result,
is the same on every run and every GPU: no atomics.
"""
from numba import cuda

from .launch import CHUNK_ROWS, MAX_CHUNKS, THREADS, blocks
from .memory import scratch


def chunks(N: int) -> tuple:
    """(row chunks, rows per chunk) for N rows: about CHUNK_ROWS rows each, at most MAX_CHUNKS."""
    n_chunks = max(1, min(MAX_CHUNKS, -(-N // CHUNK_ROWS)))
    return n_chunks, -(-N // n_chunks)


def partials(n_weights: int, N: int, C: int, dtype):
    """Scratch for stage 1: a (n_weights, chunks, C) device array (reused, not allocated per call)."""
    n_chunks, _ = chunks(N)
    return scratch(n_weights * n_chunks * C, dtype).reshape(n_weights, n_chunks, C)


def stage1_grid(n_chunks: int, C: int) -> int:
    """Blocks for stage 1: one per (chunk, column tile) task, capped (kernels grid-stride)."""
    return blocks(n_chunks * -(-C // THREADS), 1)


@cuda.jit(cache=True)
def _sum_partials(out, partial):
    """out[c] += sum_k partial[k, c], k in order: one thread per column."""
    K, C = partial.shape
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        s = partial[0, c]
        for k in range(1, K):
            s += partial[k, c]
        out[c] += s


def sum_partials(out, partial) -> None:
    """Stage 2: accumulate the column sums of partial (chunks, C) into out (C,)."""
    _sum_partials[blocks(partial.shape[1]), THREADS](out, partial)


@cuda.jit(cache=True)
def _sum_rows_partial(partial, x, rows_per_chunk):
    """Stage 1 of a plain column sum: partial[k, c] = sum of x[n, c] over chunk k's rows."""
    N, C = x.shape
    K = partial.shape[0]
    tiles = (C + cuda.blockDim.x - 1) // cuda.blockDim.x
    for task in range(cuda.blockIdx.x, K * tiles, cuda.gridDim.x):
        k = task // tiles
        c = task % tiles * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            s = x.dtype.type(0)
            for n in range(k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk)):
                s += x[n, c]
            partial[k, c] = s


def sum_columns_into(out, x) -> None:
    """out (C,) += x (N, C).sum(axis=0), deterministically in two stages."""
    N, C = x.shape
    n_chunks, rows = chunks(N)
    partial = partials(1, N, C, x.dtype)[0]
    _sum_rows_partial[stage1_grid(n_chunks, C), THREADS](partial, x, rows)
    sum_partials(out, partial)
