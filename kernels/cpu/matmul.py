"""Linear layer: out = inp @ weight^T + bias, weight stored (OC, C) as in llm.c.

With transposed=True the weight is stored (C, OC) and out = inp @ weight: a tied
embedding used the other way round, without copying it.

Every product is cut into one slab of the output per Numba thread, each slab one BLAS
call with OpenBLAS held to a single thread (split_gemm). OpenBLAS's own threading loses
up to 2.5x on the shapes a training step has most of: the classifier's input grad
(256 x 768 outputs summed over K = 50304) kept the two cores busy 2.3x longer than the
same product on one core per half. It also leaves the cores to a single thread pool
(Numba's): no hand-over between OpenBLAS's spinning workers and Numba's.
"""
from numba import njit, prange

from .blas import blas_get_threads, blas_set_threads, gemm, gemv, numba_num_threads

BIAS_BLOCK = 64  # columns per parallel task when summing bias grads
# Up to this many rows the forward is one matrix-vector product per row: OpenBLAS's sgemm
# on a single row ran 4-8x below its sgemv (token-by-token decoding is all single rows).
GEMV_ROWS = 4
SLAB_ALIGN = 16  # slab widths are multiples of 16 elements: 64-byte cache lines in float32


@njit(parallel=True, cache=True)
def split_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    """gemm (blas.gemm's arguments: row-major C[M,N] = alpha op(A) op(B) + beta C) with the
    output cut along its longer side into one slab per Numba thread, each slab a
    single-threaded BLAS call on its own core. A slab reads all of the operand along the
    other side and its own part of the one along the cut."""
    workers = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    if N >= M:
        width = ((N + workers - 1) // workers + SLAB_ALIGN - 1) // SLAB_ALIGN * SLAB_ALIGN
        for w in prange(workers):
            n0 = w * width
            n1 = min(N, n0 + width)
            if n1 > n0:
                gemm(trans_a, trans_b, M, n1 - n0, K, alpha, A, lda, B[n0:] if trans_b else B[:, n0:], ldb,
                     beta, C[:, n0:], ldc)
    else:
        height = ((M + workers - 1) // workers + SLAB_ALIGN - 1) // SLAB_ALIGN * SLAB_ALIGN
        for w in prange(workers):
            m0 = w * height
            m1 = min(M, m0 + height)
            if m1 > m0:
                gemm(trans_a, trans_b, m1 - m0, N, K, alpha, A[:, m0:] if trans_a else A[m0:], lda, B, ldb,
                     beta, C[m0:], ldc)
    blas_set_threads(blas_threads)


@njit(parallel=True, cache=True)
def matmul_forward(out, inp, weight, bias, transposed=False):
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,); bias may be empty (no bias).
    transposed: weight is (C, OC) and out = inp @ weight + bias."""
    N, C = inp.shape
    OC = out.shape[1]
    beta = 0.0
    if bias.shape[0] > 0:
        for n in prange(N):
            out[n, :] = bias
        beta = 1.0
    if N <= GEMV_ROWS:
        for n in range(N):
            if transposed:
                gemv(True, C, OC, 1.0, weight, OC, inp[n], beta, out[n])
            else:
                gemv(False, OC, C, 1.0, weight, C, inp[n], beta, out[n])
    elif transposed:
        split_gemm(False, False, N, OC, C, 1.0, inp, C, weight, OC, beta, out, OC)
    else:
        split_gemm(False, True, N, OC, C, 1.0, inp, C, weight, C, beta, out, OC)


@njit(parallel=True, cache=True)
def matmul_backward(dinp, dweight, dbias, dout, inp, weight, transposed=False):
    """Accumulate dinp += dout @ weight, dweight += dout^T @ inp, dbias += sum_n dout
    (transposed: dinp += dout @ weight^T, dweight += inp^T @ dout).

    Any of dinp, dweight, dbias may be empty: that gradient is not wanted.
    """
    N, C = inp.shape
    OC = dout.shape[1]
    if dinp.shape[0] > 0:
        if transposed:
            split_gemm(False, True, N, C, OC, 1.0, dout, OC, weight, OC, 1.0, dinp, C)
        else:
            split_gemm(False, False, N, C, OC, 1.0, dout, OC, weight, C, 1.0, dinp, C)
    if dweight.shape[0] > 0:
        if transposed:
            split_gemm(True, False, C, OC, N, 1.0, inp, C, dout, OC, 1.0, dweight, OC)
        else:
            split_gemm(True, False, OC, C, N, 1.0, dout, OC, inp, C, 1.0, dweight, C)
    if dbias.shape[0] > 0:
        # Each task owns a block of columns and walks all rows: no races, fixed order.
        for blk in prange((OC + BIAS_BLOCK - 1) // BIAS_BLOCK):
            o0 = blk * BIAS_BLOCK
            o1 = min(o0 + BIAS_BLOCK, OC)
            for n in range(N):
                for o in range(o0, o1):
                    dbias[o] += dout[n, o]
