"""LoRA adapters on a linear layer's output, added in place. G adapters that read the same
input (q, k and v of a fused qkv; gate and up) go as one group:

    h = xa @ A^T                                     A (G r, C): the G A matrices stacked
    out[:, o0_g:o0_g+rows_g] += scale * h[:, g r:(g+1) r] @ B_g^T     for each adapter g

B (sum of rows_g, r) stacks the G B matrices; parts (G, 2) holds each adapter's (o0_g,
rows_g). xa is the adapters' input (the linear's input, or a dropout of it). B @ A is
never formed; the B-side gemms write straight into column blocks of `out` (row stride OC),
so a fused output takes its adapters without copies. One group shares the gemms that run
over C: xa @ A^T, dA and dxa are one gemm each, 3r or 2r wide, instead of G gemms r wide
(each of G passes over the (N, C) dxa).

Every gemm runs as matmul's slabs (one band of the output per Numba thread, OpenBLAS held
to one thread): the rank-r gemms are skinny, and OpenBLAS's own threading split them worse
than bands do. A gemm that reads another's whole output runs in the next parallel loop
(the loop's end is the barrier). Operands go in flat (row strides given), so each gemm is
one specialization whatever the views.
"""
from numba import njit, prange

from .blas import blas_get_threads, blas_set_threads, numba_num_threads
from .matmul import _gemm_slab


@njit(parallel=True, cache=True)
def lora_forward(out, h, xa, A, B, scale, parts):
    """h (N, G r) = xa (N, C) @ A^T, kept for the backward; out[:, o0_g:o0_g+rows_g] +=
    scale * h_g @ B_g^T for each adapter g (module docstring)."""
    N, C = xa.shape
    Gr = A.shape[0]
    r = B.shape[1]
    OC = out.shape[1]
    of, hf, xf, Af, Bf = out.reshape(-1), h.reshape(-1), xa.reshape(-1), A.reshape(-1), B.reshape(-1)
    slabs = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for slab in prange(slabs):
        _gemm_slab(slab, slabs, False, True, N, Gr, C, 1.0, xf, C, Af, C, 0.0, hf, Gr)
    for slab in prange(slabs):
        b0 = 0
        for g in range(parts.shape[0]):
            o0, rows = parts[g, 0], parts[g, 1]
            _gemm_slab(slab, slabs, False, True, N, rows, r, scale, hf[g * r:], Gr, Bf[b0 * r:], r, 1.0, of[o0:], OC)
            b0 += rows
    blas_set_threads(blas_threads)


@njit(parallel=True, cache=True)
def lora_backward(dxa, dA, dB, dh, dout, h, xa, A, B, scale, parts):
    """With g_g = dout[:, o0_g:o0_g+rows_g]: dB_g += scale * g_g^T @ h_g, dh_g = scale * g_g
    @ B_g (dh (N, G r) scratch, overwritten), dA += dh^T @ xa, dxa += dh @ A. An empty dA
    or dB is not wanted (frozen adapters, e.g. while they serve as a reference): skipped."""
    N, C = xa.shape
    Gr = A.shape[0]
    r = B.shape[1]
    OC = dout.shape[1]
    gf, hf, dhf, xf, Af, Bf = dout.reshape(-1), h.reshape(-1), dh.reshape(-1), xa.reshape(-1), A.reshape(-1), B.reshape(-1)
    dxf, dAf, dBf = dxa.reshape(-1), dA.reshape(-1), dB.reshape(-1)
    slabs = numba_num_threads()
    blas_threads = blas_get_threads()
    blas_set_threads(1)
    for slab in prange(slabs):
        b0 = 0
        for g in range(parts.shape[0]):
            o0, rows = parts[g, 0], parts[g, 1]
            if dB.shape[0] > 0:
                _gemm_slab(slab, slabs, True, False, rows, r, N, scale, gf[o0:], OC, hf[g * r:], Gr, 1.0,
                           dBf[b0 * r:], r)
            _gemm_slab(slab, slabs, False, False, N, r, rows, scale, gf[o0:], OC, Bf[b0 * r:], r, 0.0, dhf[g * r:], Gr)
            b0 += rows
    for slab in prange(slabs):
        if dA.shape[0] > 0:
            _gemm_slab(slab, slabs, True, False, Gr, C, N, 1.0, dhf, Gr, xf, C, 1.0, dAf, C)
        _gemm_slab(slab, slabs, False, False, N, C, Gr, 1.0, dhf, Gr, Af, C, 1.0, dxf, C)
    blas_set_threads(blas_threads)
