"""LoRA adapter on a linear layer's output, added in place:

    out[:, o0:o0+OCp] += scale * (xa @ A^T) @ B^T        A (r, C), B (OCp, r), scale = alpha / r

xa is the adapter's input (the linear's input, or a dropout of it). The rank-r product goes
through two small gemms and never forms B @ A; the second writes straight into the column
block of `out` (row stride OC), so a fused qkv or gate_up output takes one adapter per part
without copies.
"""
from numba import njit

from .blas import gemm


@njit(cache=True)
def lora_forward(out, h, xa, A, B, scale, o0):
    """h (N, r) = xa (N, C) @ A^T, kept for the backward; out[:, o0:o0+OCp] += scale * h @ B^T."""
    N, C = xa.shape
    r = A.shape[0]
    OCp = B.shape[0]
    OC = out.shape[1]
    gemm(False, True, N, r, C, 1.0, xa, C, A, C, 0.0, h, r)
    gemm(False, True, N, OCp, r, scale, h, r, B, r, 1.0, out[:, o0:], OC)


@njit(cache=True)
def lora_backward(dxa, dA, dB, dh, dout, h, xa, A, B, scale, o0):
    """With g = dout[:, o0:o0+OCp]: dB += scale * g^T @ h, dh = scale * g @ B (scratch
    (N, r), overwritten), dA += dh^T @ xa, dxa += dh @ A. An empty dA or dB is not wanted
    (a frozen adapter, e.g. while it serves as a reference): that gemm is skipped."""
    N, C = xa.shape
    r = A.shape[0]
    OCp = B.shape[0]
    OC = dout.shape[1]
    if dB.shape[0] > 0:
        gemm(True, False, OCp, r, N, scale, dout[:, o0:], OC, h, r, 1.0, dB, r)
    gemm(False, False, N, r, OCp, scale, dout[:, o0:], OC, B, r, 0.0, dh, r)
    if dA.shape[0] > 0:
        gemm(True, False, r, C, N, 1.0, dh, r, xa, C, 1.0, dA, C)
    gemm(False, False, N, C, r, 1.0, dh, r, A, C, 1.0, dxa, C)
