"""BitNet b1.58: ternary weights, 8-bit activations (training) and ternary matmul on packed
weights (inference).

Training (quantisation-aware, straight-through estimator):
  weights, per tensor:  s = max(mean|W|, EPS)      code = clip(rint(W / s), -1, 1)      Wq = code * s
  activations, per row: a = max(max|x|, EPS)       q = clip(rint(x * 127 / a), -128, 127)  xq = q * a / 127
  forward:  out = xq @ Wq^T          backward: dx += dout @ Wq,  dW += dout^T @ xq
(the backward treats both quantisers as the identity: the STE of the BitNet papers).

Inference reads weights in llama.cpp's TQ2_0 layout, 256 weights in 66 bytes:
  qs[64] | d f16           element value d * (q - 1), q = 2-bit field in {0, 1, 2}
byte g*32 + m of qs holds elements g*128 + 32*l + m (l = 0..3) in bits 2l..2l+1. The
activations are quantised to int8 as above; each output sums q * x in integers over a
block, subtracts the block's activation sum (so the -1 offset costs nothing per weight),
and takes one float multiply by the block scale d; the row's a/127 is applied once at the
end.
"""
import numpy as np
from numba import njit, prange

from .matmul import matmul_backward, matmul_forward

EPS = 1e-5      # floor of the weight and activation scales (as the BitNet reference code)
QK = 256        # TQ2_0 elements per block
TQ2_BYTES = 66  # TQ2_0 bytes per block: 64 bytes of 2-bit codes, then d as f16


# ---------------------------------------------------------------------- quantisers

@njit(cache=True)
def _absmean(w):
    """mean |w| accumulated in float64, one thread, so the scale is the same on any thread count."""
    total = 0.0
    for i in range(w.size):
        total += abs(np.float64(w[i]))
    return total / w.size


@njit(parallel=True, cache=True)
def weight_quant(wq, scale, w):
    """wq (n,) = the dequantised ternary weights code * s of w (n,); scale (1,) <- s."""
    s = max(_absmean(w), EPS)
    scale[0] = s
    s = w.dtype.type(s)
    for i in prange(w.size):
        wq[i] = min(max(np.rint(w[i] / s), -1.0), 1.0) * s


@njit(parallel=True, cache=True)
def act_quant(xq, xs, x):
    """Per row n of x (N, C): xs[n] = a / 127 with a = max(max|x[n]|, EPS) and xq[n] = the
    dequantised int8 codes q * xs[n]."""
    N, C = x.shape
    for n in prange(N):
        a = x.dtype.type(EPS)
        for c in range(C):
            a = max(a, abs(x[n, c]))
        inv = x.dtype.type(127.0) / a     # in x's precision: float32 codes as the packed path's
        xs[n] = a / x.dtype.type(127.0)
        for c in range(C):
            xq[n, c] = min(max(np.rint(x[n, c] * inv), -128.0), 127.0) * xs[n]


# ---------------------------------------------------------------------- BitLinear (training)

def bitlinear_forward(out, xq, xs, wq, scale, x, w):
    """out (N, OC) = actquant(x) @ weightquant(w)^T for x (N, C), w (OC, C). Keeps what the
    backward needs: xq (N, C) and wq (OC, C), the dequantised quantised inputs, xs (N,) and
    scale (1,) the row and tensor scales."""
    weight_quant(wq.reshape(-1), scale, w.reshape(-1))
    act_quant(xq, xs, x)
    matmul_forward(out, xq, wq, wq.reshape(-1)[:0], False)  # no bias


def bitlinear_backward(dx, dw, dout, xq, wq):
    """Straight-through estimator: dx += dout @ wq, dw += dout^T @ xq (an empty dw: frozen)."""
    matmul_backward(dx, dw, wq.reshape(-1)[:0], dout, xq, wq, False)  # no bias


# ---------------------------------------------------------------------- TQ2_0 packing

@njit(parallel=True, cache=True)
def pack_tq2_0(raw, codes, d16):
    """raw (nb * 66,) uint8 <- TQ2_0 blocks of the ternary codes (nb * 256,) int8 and the
    blocks' scales d16 (nb,) (float16 bit patterns, as uint16)."""
    for b in prange(d16.shape[0]):
        p, o = b * TQ2_BYTES, b * QK
        for g in range(2):
            for m in range(32):
                e = o + g * 128 + m
                byte = 0
                for l in range(4):
                    byte |= (np.int64(codes[e + 32 * l]) + 1) << (2 * l)
                raw[p + g * 32 + m] = byte
        raw[p + 64] = d16[b] & 255
        raw[p + 65] = d16[b] >> 8


@njit(parallel=True, cache=True)
def dequantize_tq2_0(out, raw, f16):
    """out (nb * 256,) float32 <- d * (q - 1) of TQ2_0 blocks raw (nb * 66,) uint8."""
    for b in prange(out.shape[0] // QK):
        p, o = b * TQ2_BYTES, b * QK
        d = f16[np.int64(raw[p + 64]) | (np.int64(raw[p + 65]) << 8)]
        for g in range(2):
            for m in range(32):
                byte = np.int64(raw[p + g * 32 + m])
                for l in range(4):
                    out[o + g * 128 + 32 * l + m] = d * np.float32(((byte >> (2 * l)) & 3) - 1)


# ---------------------------------------------------------------------- ternary matmul (inference)

@njit(parallel=True, cache=True)
def act_quant_int8(q, xs, qsum, x):
    """Per row n of x (N, C) float32: int8 codes q[n] = clip(rint(x * 127 / a), -128, 127)
    with xs[n] = a / 127 (the act_quant rule), and qsum (N, C/256) int32 the codes' sum
    per 256-block (what the -1 offset of the TQ2_0 codes subtracts)."""
    N, C = x.shape
    for n in prange(N):
        a = np.float32(EPS)
        for c in range(C):
            a = max(a, abs(x[n, c]))
        inv = np.float32(127.0) / a
        xs[n] = a / np.float32(127.0)
        for b in range(C // QK):
            total = 0
            for c in range(b * QK, (b + 1) * QK):
                v = np.int32(min(max(np.rint(x[n, c] * inv), -128.0), 127.0))
                q[n, c] = v
                total += v
            qsum[n, b] = total


@njit(parallel=True, cache=True)
def matmul_tq2_0(out, q, xs, qsum, w, f16):
    """out (N, OC) = (q (N, C) int8 * xs) @ W^T for W (OC, C) stored as TQ2_0 rows w (OC,
    C/256*66) uint8. Integer products summed in int32 per block; per block one multiply by
    d; per output one multiply by xs[n]. Parallel over output rows."""
    N, C = q.shape
    for oc in prange(w.shape[0]):
        row = w[oc]
        for n in range(N):
            qn = q[n]
            acc = np.float32(0.0)
            for b in range(C // QK):
                p, o = b * TQ2_BYTES, b * QK
                isum = np.int32(0)
                for g in range(2):
                    for m in range(32):
                        byte = np.int32(row[p + g * 32 + m])
                        e = o + g * 128 + m
                        isum += ((byte & 3) * np.int32(qn[e]) + ((byte >> 2) & 3) * np.int32(qn[e + 32])
                                 + ((byte >> 4) & 3) * np.int32(qn[e + 64]) + (byte >> 6) * np.int32(qn[e + 96]))
                d = f16[np.int64(row[p + 64]) | (np.int64(row[p + 65]) << 8)]
                acc += d * np.float32(isum - qsum[n, b])
            out[n, oc] = acc * xs[n]
