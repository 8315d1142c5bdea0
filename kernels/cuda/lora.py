"""LoRA adapter on a linear layer's output, added in place (twin of nt.kernels.cpu.lora):

    out[:, o0:o0+OCp] += scale * (xa @ A^T) @ B^T        A (r, C), B (OCp, r)

Four gemms on cuBLAS (or the tiled kernel); the output's column block is a strided view.
"""
from .matmul import gemm


def lora_forward(out, h, xa, A, B, scale, o0):
    """h (N, r) = xa (N, C) @ A^T, kept for the backward; out[:, o0:o0+OCp] += scale * h @ B^T."""
    gemm(False, True, xa, A, 0.0, h)
    gemm(False, True, h, B, 1.0, out[:, o0:o0 + B.shape[0]], alpha=scale)


def lora_backward(dxa, dA, dB, dh, dout, h, xa, A, B, scale, o0):
    """With g = dout[:, o0:o0+OCp]: dB += scale * g^T @ h, dh = scale * g @ B (scratch,
    overwritten), dA += dh^T @ xa, dxa += dh @ A; an empty dA or dB is skipped."""
    g = dout[:, o0:o0 + B.shape[0]]
    if dB.shape[0] > 0:
        gemm(True, False, g, h, 1.0, dB, alpha=scale)
    gemm(False, False, g, B, 0.0, dh, alpha=scale)
    if dA.shape[0] > 0:
        gemm(True, False, dh, xa, 1.0, dA)
    gemm(False, False, dh, A, 1.0, dxa)
