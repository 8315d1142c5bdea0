"""LoRA adapters on a linear layer's output, added in place (twin of nt.kernels.cpu.lora):
G adapters reading one input share the gemms over C:

    h = xa @ A^T                                     A (G r, C) stacked
    out[:, o0_g:o0_g+rows_g] += scale * h[:, g r:(g+1) r] @ B_g^T     B (sum rows_g, r) stacked

parts (G, 2): each adapter's (o0_g, rows_g), a host array. Gemms on cuBLAS (or the tiled
kernel); column blocks are strided views.
"""
from .matmul import gemm


def lora_forward(out, h, xa, A, B, scale, parts):
    """h (N, G r) = xa (N, C) @ A^T, kept for the backward; out[:, o0_g:o0_g+rows_g] +=
    scale * h_g @ B_g^T for each adapter g."""
    r = B.shape[1]
    gemm(False, True, xa, A, 0.0, h)
    b0 = 0
    for g, (o0, rows) in enumerate(parts):
        gemm(False, True, h[:, g * r:(g + 1) * r], B[b0:b0 + rows], 1.0, out[:, o0:o0 + rows], alpha=scale)
        b0 += rows


def lora_backward(dxa, dA, dB, dh, dout, h, xa, A, B, scale, parts):
    """With g_g = dout[:, o0_g:o0_g+rows_g]: dB_g += scale * g_g^T @ h_g, dh_g = scale * g_g
    @ B_g (scratch, overwritten), dA += dh^T @ xa, dxa += dh @ A; an empty dA or dB is skipped."""
    r = B.shape[1]
    b0 = 0
    for g, (o0, rows) in enumerate(parts):
        grad = dout[:, o0:o0 + rows]
        if dB.shape[0] > 0:
            gemm(True, False, grad, h[:, g * r:(g + 1) * r], 1.0, dB[b0:b0 + rows], alpha=scale)
        gemm(False, False, grad, B[b0:b0 + rows], 0.0, dh[:, g * r:(g + 1) * r], alpha=scale)
        b0 += rows
    if dA.shape[0] > 0:
        gemm(True, False, dh, xa, 1.0, dA)
    gemm(False, False, dh, A, 1.0, dxa)
