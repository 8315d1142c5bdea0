"""Linear layer: out = inp @ weight^T + bias, weight stored (OC, C) as in llm.c.

With transposed=True the weight is stored (C, OC) and out = inp @ weight: a tied
embedding used the other way round, without copying it.
"""
from numba import njit, prange

from .blas import gemm, gemv

BIAS_BLOCK = 64  # columns per parallel task when summing bias grads
# Up to this many rows the forward is one matrix-vector product per row: OpenBLAS's sgemm
# on a single row ran 4-8x below its sgemv (token-by-token decoding is all single rows).
GEMV_ROWS = 4


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
        gemm(False, False, N, OC, C, 1.0, inp, C, weight, OC, beta, out, OC)
    else:
        gemm(False, True, N, OC, C, 1.0, inp, C, weight, C, beta, out, OC)


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
            gemm(False, True, N, C, OC, 1.0, dout, OC, weight, OC, 1.0, dinp, C)
        else:
            gemm(False, False, N, C, OC, 1.0, dout, OC, weight, C, 1.0, dinp, C)
    if dweight.shape[0] > 0:
        if transposed:
            gemm(True, False, C, OC, N, 1.0, inp, C, dout, OC, 1.0, dweight, OC)
        else:
            gemm(True, False, OC, C, N, 1.0, dout, OC, inp, C, 1.0, dweight, C)
    if dbias.shape[0] > 0:
        # Each task owns a block of columns and walks all rows: no races, fixed order.
        for blk in prange((OC + BIAS_BLOCK - 1) // BIAS_BLOCK):
            o0 = blk * BIAS_BLOCK
            o1 = min(o0 + BIAS_BLOCK, OC)
            for n in range(N):
                for o in range(o0, o1):
                    dbias[o] += dout[n, o]
