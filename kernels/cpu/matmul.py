"""Linear layer: out = inp @ weight^T + bias, weight stored (OC, C) as in llm.c.

With transposed=True the weight is stored (C, OC) and out = inp @ weight: a tied
embedding used the other way round, without copying it.

Every product is cut into one slab of the output per Numba thread (the count read inside
the kernel through blas.numba_num_threads, so the kernels cache), each slab one BLAS
call with OpenBLAS held to a single thread (_gemm_slab). OpenBLAS's own threading loses
up to 2.5x on the shapes a training step has most of: the classifier's input grad
(256 x 768 outputs summed over K = 50304) kept the two cores busy 2.3x longer than the
same product on one core per half. It also leaves the cores to a single thread pool
(Numba's): no hand-over between OpenBLAS's spinning workers and Numba's.
"""
import numpy as np
from numba import njit, prange

from .blas import blas_get_threads, blas_set_threads, gemm, gemv, numba_num_threads

BIAS_BLOCK = 64  # columns per parallel task when summing bias grads
# Up to this many rows the forward is one matrix-vector product per row: OpenBLAS's sgemm
# on a single row ran 4-8x below its sgemv (token-by-token decoding is all single rows).
GEMV_ROWS = 4
SLAB_ALIGN = 16  # slab widths are multiples of 16 elements: 64-byte cache lines in float32


@njit(cache=True)
def _band(slab, slabs, M, N):
    """Rows [r0, r1) and columns [c0, c1) of slab `slab` of `slabs` of an (M, N) output:
    a band of columns when N >= M, else of rows, its width a multiple of SLAB_ALIGN (the
    last band may be empty)."""
    if N >= M:
        width = ((N + slabs - 1) // slabs + SLAB_ALIGN - 1) // SLAB_ALIGN * SLAB_ALIGN
        c0 = min(N, slab * width)
        return 0, M, c0, min(N, c0 + width)
    height = ((M + slabs - 1) // slabs + SLAB_ALIGN - 1) // SLAB_ALIGN * SLAB_ALIGN
    r0 = min(M, slab * height)
    return r0, min(M, r0 + height), 0, N


@njit(cache=True)
def _gemm_slab(slab, slabs, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    """Slab `slab` of `slabs` (see _band) of gemm(trans_a, trans_b, M, N, K, ...) (blas.gemm's
    arguments). Operands go to BLAS as flat arrays starting at the band (reshape refuses
    a non-contiguous array rather than copying it): one specialization of gemm for all."""
    r0, r1, c0, c1 = _band(slab, slabs, M, N)
    if r1 > r0 and c1 > c0:
        gemm(trans_a, trans_b, r1 - r0, c1 - c0, K, alpha, A.reshape(-1)[r0 if trans_a else r0 * lda:], lda,
             B.reshape(-1)[c0 * ldb if trans_b else c0:], ldb, beta, C.reshape(-1)[r0 * ldc + c0:], ldc)


# Each kernel is one parallel loop over the slabs (every parallel loop costs compile time):
# the bias fill and the bias grad ride in the same loop as the products. Each distinct
# argument type is a specialization compiled again on a cold start (~1.5 s for these
# kernels, ~0.4 s for _gemm_slab): the slab index goes on as intp (a prange index is
# unsigned in some loops, which made every _gemm_slab and _band twice), the single-row
# path has one gemv call site, and callers pass `transposed` as a bool always (an omitted
# default is a type of its own: two compiles of each kernel).
@njit(parallel=True, cache=True)
def matmul_forward(out, inp, weight, bias, transposed=False):
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,); bias may be empty (no bias).
    transposed: weight is (C, OC) and out = inp @ weight + bias."""
    N, C = inp.shape
    OC = out.shape[1]
    has_bias = bias.shape[0] > 0
    beta = 1.0 if has_bias else 0.0
    if N <= GEMV_ROWS:
        # weight is (rows, cols) row-major: out[n] = W^T inp[n] when transposed, else W inp[n]
        rows, cols = (C, OC) if transposed else (OC, C)
        for n in range(N):
            if has_bias:
                out[n, :] = bias
            gemv(transposed, rows, cols, 1.0, weight, cols, inp[n], beta, out[n])
        return
    slabs = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for s in prange(slabs):
        slab = np.intp(s)
        if has_bias:
            r0, r1, c0, c1 = _band(slab, slabs, N, OC)
            for n in range(r0, r1):
                out[n, c0:c1] = bias[c0:c1]
        _gemm_slab(slab, slabs, False, not transposed, N, OC, C, 1.0, inp, C, weight, OC if transposed else C,
                   beta, out, OC)
    blas_set_threads(blas_threads)


@njit(parallel=True, cache=True)
def matmul_backward(dinp, dweight, dbias, dout, inp, weight, transposed=False):
    """Accumulate dinp += dout @ weight, dweight += dout^T @ inp, dbias += sum_n dout
    (transposed: dinp += dout @ weight^T, dweight += inp^T @ dout).

    Any of dinp, dweight, dbias may be empty: that gradient is not wanted. Each thread
    computes its slab of dinp, its slab of dweight and its share of dbias's columns.
    """
    N, C = inp.shape
    OC = dout.shape[1]
    # dweight (M, K) = op(A) @ B with the weight's orientation picked here, once, so the
    # loop has one call per product (each call site costs compile time)
    if transposed:
        wa, wb, wM, wN, ldwa, ldwb = inp, dout, C, OC, C, OC
    else:
        wa, wb, wM, wN, ldwa, ldwb = dout, inp, OC, C, OC, C
    slabs = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for s in prange(slabs):
        slab = np.intp(s)
        if dinp.shape[0] > 0:
            _gemm_slab(slab, slabs, False, transposed, N, C, OC, 1.0, dout, OC, weight, OC if transposed else C,
                       1.0, dinp, C)
        if dweight.shape[0] > 0:
            _gemm_slab(slab, slabs, True, False, wM, wN, N, 1.0, wa, ldwa, wb, ldwb, 1.0, dweight, wN)
        if dbias.shape[0] > 0:
            # blocks of BIAS_BLOCK columns, each summed over all rows by one thread: no races, fixed order
            for blk in range(slab, (OC + BIAS_BLOCK - 1) // BIAS_BLOCK, slabs):
                o0 = blk * BIAS_BLOCK
                o1 = min(o0 + BIAS_BLOCK, OC)
                for n in range(N):
                    for o in range(o0, o1):
                        dbias[o] += dout[n, o]
    blas_set_threads(blas_threads)
