"""Linear layer on the GPU: out = inp @ weight^T + bias, weight stored (OC, C) as in llm.c
(or (C, OC) with transposed=True: a tied embedding used the other way round).

GEMMs go to cuBLAS when it loads (cublas.py, untested on hardware); otherwise (always
under the simulator) to the tiled shared-memory kernel below, with the same semantics.
"""
import numpy as np
from numba import cuda

from . import cublas
from .launch import MAX_BLOCKS, THREADS, TILE, blocks


@cuda.jit(cache=True)
def _gemm_tiled(trans_a, trans_b, alpha, A, B, beta, C):
    """C[M,N] = alpha * op(A) @ op(B) + beta * C; beta == 0 never reads C.

    Each block computes TILE x TILE tiles of C (grid-stride over tiles), staging TILE-wide
    slices of op(A) and op(B) in shared memory. Accumulates in float64.
    """
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    As = cuda.shared.array((TILE, TILE), np.float64)
    Bs = cuda.shared.array((TILE, TILE), np.float64)
    ty = cuda.threadIdx.y
    tx = cuda.threadIdx.x
    tiles_n = (N + TILE - 1) // TILE
    n_tiles = (M + TILE - 1) // TILE * tiles_n
    for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
        i = tile // tiles_n * TILE + ty  # this thread's row and column of C
        j = tile % tiles_n * TILE + tx
        acc = 0.0
        for k0 in range(0, K, TILE):
            ka = k0 + tx  # the column of op(A) this thread stages
            kb = k0 + ty  # the row of op(B) this thread stages
            a = 0.0
            if i < M and ka < K:
                a = A[ka, i] if trans_a else A[i, ka]
            b = 0.0
            if kb < K and j < N:
                b = B[j, kb] if trans_b else B[kb, j]
            As[ty, tx] = a
            Bs[ty, tx] = b
            cuda.syncthreads()
            for kk in range(TILE):
                acc += As[ty, kk] * Bs[kk, tx]
            cuda.syncthreads()
        if i < M and j < N:
            if beta != 0.0:
                acc = alpha * acc + beta * C[i, j]
            else:
                acc = alpha * acc
            C[i, j] = acc


def gemm(trans_a: bool, trans_b: bool, A, B, beta: float, C, alpha: float = 1.0) -> None:
    """Row-major C = alpha * op(A) @ op(B) + beta * C (beta 0 or 1), on cuBLAS or the tiled
    kernel. Operands may be row blocks or column blocks of larger matrices (unit column
    stride, any row stride)."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    if cublas.available():
        cublas.gemm(trans_a, trans_b, M, N, K, alpha, A, B, beta, C)
    else:
        n_tiles = -(-M // TILE) * -(-N // TILE)
        _gemm_tiled[min(MAX_BLOCKS, n_tiles), (TILE, TILE)](trans_a, trans_b, alpha, A, B, beta, C)


@cuda.jit(cache=True)
def _broadcast_rows(out, bias):
    """out[n, :] = bias for every row."""
    N, OC = out.shape
    for i in range(cuda.grid(1), N * OC, cuda.gridsize(1)):
        out[i // OC, i % OC] = bias[i % OC]


@cuda.jit(cache=True)
def _sum_rows_into(dbias, dout):
    """dbias[o] += sum_n dout[n, o]: one thread per column walks all rows, so each
    element has a single writer and a fixed summation order (no atomics)."""
    N, OC = dout.shape
    for o in range(cuda.grid(1), OC, cuda.gridsize(1)):
        s = 0.0
        for n in range(N):
            s += dout[n, o]
        dbias[o] += s


def matmul_forward(out, inp, weight, bias, transposed=False):
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,); bias may be empty (no bias).
    transposed: weight is (C, OC) and out = inp @ weight + bias."""
    N, OC = out.shape
    beta = 0.0
    if bias.shape[0] > 0:
        _broadcast_rows[blocks(N * OC), THREADS](out, bias)
        beta = 1.0
    gemm(False, not transposed, inp, weight, beta, out)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, transposed=False):
    """Accumulate dinp += dout @ weight, dweight += dout^T @ inp, dbias += sum_n dout
    (transposed: dinp += dout @ weight^T, dweight += inp^T @ dout).

    Any of dinp, dweight, dbias may be empty: that gradient is not wanted.
    """
    if dinp.shape[0] > 0:
        gemm(False, transposed, dout, weight, 1.0, dinp)
    if dweight.shape[0] > 0:
        if transposed:
            gemm(True, False, inp, dout, 1.0, dweight)
        else:
            gemm(True, False, dout, inp, 1.0, dweight)
    if dbias.shape[0] > 0:
        _sum_rows_into[blocks(dbias.shape[0]), THREADS](dbias, dout)
