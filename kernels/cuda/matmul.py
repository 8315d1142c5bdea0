"""Linear layer on the GPU: out = inp @ weight^T + bias, weight stored (OC, C) as in llm.c
(or (C, OC) with transposed=True: a tied embedding used the other way round).

GEMMs go to cuBLAS on a GPU (cublas.py; a clear error if it cannot load: no silent slow
path). The tiled shared-memory kernel below, with the same semantics, serves only the
simulator, which has no cuBLAS. Bias grads are a deterministic two-stage column sum (reduce.py).

bf16 mixed precision (matmul_forward_bf16 / matmul_backward_bf16, used by a tape with
precision="bf16"): the operands are rounded to bf16 (RNE) and multiplied with float32
accumulation into float32 outputs and grads. On a GPU that is cuBLAS gemm_ex (bf16 inputs,
CUBLAS_COMPUTE_32F); under the simulator the bf16 operands are widened back to float32
(exactly) and the tiled kernel multiplies them in float32: a product of two bf16 values is
exact in float32, so both compute the same sums, up to the order of the additions.
"""
import numpy as np
from numba import cuda

from . import bf16, cublas, reduce
from .launch import MAX_BLOCKS, SIMULATOR, THREADS, TILE, blocks, shared_bytes


@cuda.jit(cache=True)
def _gemm_tiled(trans_a, trans_b, alpha, A, B, beta, C):
    """C[M,N] = alpha * op(A) @ op(B) + beta * C; beta == 0 never reads C.

    Blocks of tile x tile threads (tile = blockDim.x, set at launch) compute tile x tile
    tiles of C (grid-stride over tiles), staging tile-wide slices of op(A) and op(B) in
    dynamic shared memory (2 * tile * tile values). Accumulates in C's dtype.
    """
    dt = C.dtype.type
    T = cuda.blockDim.x
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    tiles = cuda.shared.array(0, C.dtype)  # op(A) tile at [0, T*T), op(B) tile at [T*T, 2*T*T)
    ty = cuda.threadIdx.y
    tx = cuda.threadIdx.x
    tiles_n = (N + T - 1) // T
    n_tiles = (M + T - 1) // T * tiles_n
    for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
        i = tile // tiles_n * T + ty  # this thread's row and column of C
        j = tile % tiles_n * T + tx
        acc = dt(0)
        for k0 in range(0, K, T):
            ka = k0 + tx  # the column of op(A) this thread stages
            kb = k0 + ty  # the row of op(B) this thread stages
            a = dt(0)
            if i < M and ka < K:
                a = A[ka, i] if trans_a else A[i, ka]
            b = dt(0)
            if kb < K and j < N:
                b = B[j, kb] if trans_b else B[kb, j]
            tiles[ty * T + tx] = a
            tiles[T * T + ty * T + tx] = b
            cuda.syncthreads()
            for kk in range(T):
                acc += tiles[ty * T + kk] * tiles[T * T + kk * T + tx]
            cuda.syncthreads()
        if i < M and j < N:
            acc *= dt(alpha)
            if dt(beta) != dt(0):
                acc += dt(beta) * C[i, j]
            C[i, j] = acc


def gemm(trans_a: bool, trans_b: bool, A, B, beta: float, C, alpha: float = 1.0) -> None:
    """Row-major C = alpha * op(A) @ op(B) + beta * C (beta 0 or 1), on cuBLAS or the tiled
    kernel. Operands may be row blocks or column blocks of larger matrices (unit column
    stride, any row stride). A and B may both be bf16 bits (uint16) with C float32: float32
    accumulation of exact products (module docstring)."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    if A.dtype != C.dtype or B.dtype != C.dtype:
        if not (A.dtype == B.dtype == np.uint16 and C.dtype == np.float32):
            raise TypeError(f"gemm: operands {A.dtype}, {B.dtype} with output {C.dtype}: need one float "
                            "dtype throughout, or bf16 (uint16) operands with a float32 output")
        if SIMULATOR:
            A, B = bf16.widen(A, 0), bf16.widen(B, 1)
    if SIMULATOR:  # the simulator has no cuBLAS; on hardware cublas.gemm raises if it cannot load
        gemm_tiled(trans_a, trans_b, A, B, beta, C, alpha)
    else:
        cublas.gemm(trans_a, trans_b, M, N, K, alpha, A, B, beta, C)


def gemm_tiled(trans_a: bool, trans_b: bool, A, B, beta: float, C, alpha: float = 1.0) -> None:
    """gemm() on the tiled kernel (the simulator's GEMM; on a GPU, tests compare it to cuBLAS)."""
    M, N = C.shape
    n_tiles = -(-M // TILE) * -(-N // TILE)
    _gemm_tiled[min(MAX_BLOCKS, n_tiles), (TILE, TILE), 0, shared_bytes(C.dtype, 2 * TILE * TILE)](
        trans_a, trans_b, alpha, A, B, beta, C)


@cuda.jit(cache=True)
def _broadcast_rows(out, bias):
    """out[n, :] = bias for every row."""
    N, OC = out.shape
    for i in range(cuda.grid(1), N * OC, cuda.gridsize(1)):
        out[i // OC, i % OC] = bias[i % OC]


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
        reduce.sum_columns_into(dbias, dout)


def _bf16_weight(weight, shadows):
    """weight's bf16 copy from `shadows` (bf16.Shadows), or with shadows None (a weight that
    lives only for this call, e.g. dequantised into scratch) rounded now into operand slot 2."""
    return shadows.of(weight) if shadows is not None else bf16.operand(weight, 2)


def matmul_forward_bf16(out, inp, weight, bias, transposed, shadows) -> None:
    """matmul_forward with bf16 operands: inp rounded to bf16 here, weight's bf16 copy from
    `shadows` (bf16.Shadows, rounded once per forward; None: rounded here too); float32
    accumulation, out and bias float32."""
    if out.dtype != np.float32:
        raise TypeError(f"bf16 matmuls need float32 activations, got {out.dtype}")
    N, OC = out.shape
    beta = 0.0
    if bias.shape[0] > 0:
        _broadcast_rows[blocks(N * OC), THREADS](out, bias)
        beta = 1.0
    gemm(False, not transposed, bf16.operand(inp, 0), _bf16_weight(weight, shadows), beta, out)


def matmul_backward_bf16(dinp, dweight, dbias, dout, inp, weight, transposed, shadows) -> None:
    """matmul_backward with bf16 operands: dout and inp rounded to bf16, the weight's copy
    from `shadows` (the one its forward used); grads accumulate in float32 (dbias from the
    float32 dout)."""
    g = bf16.operand(dout, 0)
    if dinp.shape[0] > 0:
        gemm(False, transposed, g, _bf16_weight(weight, shadows), 1.0, dinp)
    if dweight.shape[0] > 0:
        x = bf16.operand(inp, 1)
        if transposed:
            gemm(True, False, x, g, 1.0, dweight)
        else:
            gemm(True, False, g, x, 1.0, dweight)
    if dbias.shape[0] > 0:
        reduce.sum_columns_into(dbias, dout)
