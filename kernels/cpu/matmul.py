"""Linear layer: out = inp @ weight^T + bias, weight stored (OC, C) as in llm.c.

With transposed=True the weight is stored (C, OC) and out = inp @ weight: a tied
embedding used the other way round, without copying it.

Every product is cut into one slab of the output per Numba thread, each slab one BLAS
call with OpenBLAS held to a single thread (_gemm_slab). OpenBLAS's own threading loses
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


@njit(cache=True)
def _gemm_slab(slab, slabs, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    """Slab `slab` of `slabs` of the product gemm(trans_a, trans_b, M, N, K, ...) (blas.gemm's
    arguments): a band of C's columns when N >= M, else of its rows, the band's width a
    multiple of SLAB_ALIGN (the last band may be empty).
    Operands go to BLAS as flat arrays starting at the band (reshape refuses a
    non-contiguous array rather than copying it): one specialization of gemm for all."""
    a_off = b_off = c_off = 0
    if N >= M:
        width = ((N + slabs - 1) // slabs + SLAB_ALIGN - 1) // SLAB_ALIGN * SLAB_ALIGN
        lo = slab * width
        rows, cols = M, min(N, lo + width) - lo
        b_off = lo * ldb if trans_b else lo
        c_off = lo
    else:
        height = ((M + slabs - 1) // slabs + SLAB_ALIGN - 1) // SLAB_ALIGN * SLAB_ALIGN
        lo = slab * height
        rows, cols = min(M, lo + height) - lo, N
        a_off = lo if trans_a else lo * lda
        c_off = lo * ldc
    if rows > 0 and cols > 0:
        gemm(trans_a, trans_b, rows, cols, K, alpha, A.reshape(-1)[a_off:], lda, B.reshape(-1)[b_off:], ldb,
             beta, C.reshape(-1)[c_off:], ldc)


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
        return
    slabs = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for slab in prange(slabs):
        _gemm_slab(slab, slabs, False, not transposed, N, OC, C, 1.0, inp, C, weight, OC if transposed else C,
                   beta, out, OC)
    blas_set_threads(blas_threads)


@njit(parallel=True, cache=True)
def matmul_backward(dinp, dweight, dbias, dout, inp, weight, transposed=False):
    """Accumulate dinp += dout @ weight, dweight += dout^T @ inp, dbias += sum_n dout
    (transposed: dinp += dout @ weight^T, dweight += inp^T @ dout).

    Any of dinp, dweight, dbias may be empty: that gradient is not wanted. Each thread
    computes its slab of dinp, then its slab of dweight, in one parallel region.
    """
    N, C = inp.shape
    OC = dout.shape[1]
    slabs = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for slab in prange(slabs):
        if dinp.shape[0] > 0:
            if transposed:
                _gemm_slab(slab, slabs, False, True, N, C, OC, 1.0, dout, OC, weight, OC, 1.0, dinp, C)
            else:
                _gemm_slab(slab, slabs, False, False, N, C, OC, 1.0, dout, OC, weight, C, 1.0, dinp, C)
        if dweight.shape[0] > 0:
            if transposed:
                _gemm_slab(slab, slabs, True, False, C, OC, N, 1.0, inp, C, dout, OC, 1.0, dweight, OC)
            else:
                _gemm_slab(slab, slabs, True, False, OC, C, N, 1.0, dout, OC, inp, C, 1.0, dweight, C)
    blas_set_threads(blas_threads)
    if dbias.shape[0] > 0:
        # Each task owns a block of columns and walks all rows: no races, fixed order.
        for blk in prange((OC + BIAS_BLOCK - 1) // BIAS_BLOCK):
            o0 = blk * BIAS_BLOCK
            o1 = min(o0 + BIAS_BLOCK, OC)
            for n in range(N):
                for o in range(o0, o1):
                    dbias[o] += dout[n, o]
