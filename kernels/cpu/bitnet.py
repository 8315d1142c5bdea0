"""BitNet b1.58: ternary weights, 8-bit activations (training) and ternary matmul on packed
weights (inference).

Training (quantisation-aware, straight-through estimator):
  weights, per tensor:  s = max(mean|W|, EPS)      code = clip(rint(W / s), -1, 1)      Wq = code * s
  activations, per row: a = max(max|x|, EPS)       q = clip(rint(x * 127 / a), -128, 127)  xq = q * a / 127
  forward:  out = xq @ Wq^T          backward: dx += dout @ Wq,  dW += dout^T @ xq
(the backward treats both quantisers as the identity: the STE of the BitNet papers).

Inference packs the ternary codes 2 bits per weight with one f16 scale per row ("T2", see
pack_t2) and multiplies them with int8 activation codes in integers: one multiply by the
row's scale and one by the activation row's a/127 per output (matmul_t2).

GGUF files hold llama.cpp's TQ2_0 instead, 256 weights in 66 bytes:
  qs[64] | d f16           element value d * (q - 1), q = 2-bit field in {0, 1, 2}
byte g*32 + m of qs holds elements g*128 + 32*l + m (l = 0..3) in bits 2l..2l+1
(pack_tq2_0, dequantize_tq2_0).
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
# nt's packed rows ("T2"): a row of C ternary weights is C/4 bytes of codes + the row's scale as
# f16 (2 bytes). Byte k holds q = code + 1 of elements k, k + C/4, k + 2C/4, k + 3C/4 in bits
# 0-1, 2-3, 4-5, 6-7: four contiguous planes, so the matmul's inner loop is one long,
# vectorisable pass over k (measured 1.5x faster than on TQ2_0's 32-byte groups).

@njit(parallel=True, cache=True)
def pack_t2(raw, codes, d16):
    """raw (OC, C/4 + 2) uint8 <- T2 rows of ternary codes (OC, C) int8 with row scales d16 (OC,) (f16 bits)."""
    OC, C = codes.shape
    K = C // 4
    for o in prange(OC):
        for k in range(K):
            byte = 0
            for l in range(4):
                byte |= (np.int64(codes[o, k + l * K]) + 1) << (2 * l)
            raw[o, k] = byte
        raw[o, K] = d16[o] & 255
        raw[o, K + 1] = d16[o] >> 8


@njit(parallel=True, cache=True)
def unpack_t2(out, raw, f16):
    """out (OC, C) float32 <- d * code of T2 rows raw (OC, C/4 + 2)."""
    OC, C = out.shape
    K = C // 4
    for o in prange(OC):
        d = f16[np.int64(raw[o, K]) | (np.int64(raw[o, K + 1]) << 8)]
        for k in range(K):
            byte = np.int64(raw[o, k])
            for l in range(4):
                out[o, k + l * K] = d * np.float32(((byte >> (2 * l)) & 3) - 1)


@njit(parallel=True, cache=True)
def act_quant_int8(q, xs, qsum, x):
    """Per row n of x (N, C) float32: codes q[n] = clip(rint(x * 127 / a), -128, 127) (int8
    values, stored int16 for the matmul's 16-bit multiplies) with xs[n] = a / 127 (the
    act_quant rule), and qsum[n] their sum (what the +1 offset of the stored codes adds)."""
    N, C = x.shape
    for n in prange(N):
        a = np.float32(EPS)
        for c in range(C):
            a = max(a, abs(x[n, c]))
        inv = np.float32(127.0) / a
        xs[n] = a / np.float32(127.0)
        total = 0
        for c in range(C):
            v = np.int16(min(max(np.rint(x[n, c] * inv), -128.0), 127.0))
            q[n, c] = v
            total += v
        qsum[n] = total


@njit(parallel=True, cache=True)
def matmul_t2(out, q, xs, qsum, w, f16):
    """out (N, OC) = (q (N, C) * xs) @ W^T for W (OC, C) stored as T2 rows w (OC, C/4 + 2).

    Per output: the integer sum of stored code (0..2) times activation code over the row,
    minus the codes' sum (the +1 offset), then one multiply by the row scale d and one by
    xs[n]. The running sum is truncated to int32 at every step (it fits: |sum| <= 2 * 128 * C),
    which lets LLVM keep 32-bit lanes and multiply 16-bit pairs (vpmaddwd on AVX2) instead
    of widening everything to 64 bits as Numba's integer typing would. Parallel over rows."""
    N, C = q.shape
    K = C // 4
    for oc in prange(w.shape[0]):
        row = w[oc]
        d = f16[np.int64(row[K]) | (np.int64(row[K + 1]) << 8)]
        for n in range(N):
            qn = q[n]
            isum = np.int32(0)
            for k in range(K):
                byte = np.int32(row[k])
                isum = np.int32(isum + np.int32((byte & 3) * qn[k] + ((byte >> 2) & 3) * qn[k + K]
                                                + ((byte >> 4) & 3) * qn[k + 2 * K] + (byte >> 6) * qn[k + 3 * K]))
            out[n, oc] = d * np.float32(isum - qsum[n]) * xs[n]


# ---------------------------------------------------------------------- TQ1_0 (GGUF, 1.69 bits per weight)
# 256 weights in 54 bytes: qs[48] | qh[4] | d f16. q = code + 1 in {0, 1, 2} are base-3 digits:
# byte m of qs[0:32] holds elements m + 32j (j = 0..4), byte m of qs[32:48] elements
# 160 + m + 16j, byte m of qh elements 240 + m + 4j (j = 0..3), the first element the most
# significant digit; the number v is stored as ceil(v * 256 / 243), so digit j is recovered
# as ((byte * 3^j) mod 256) * 3 >> 8.
TQ1_BYTES = 54
TQ1_GROUPS = ((0, 0, 32, 5), (32, 160, 16, 5), (48, 240, 4, 4))   # (byte offset, first element, bytes, digits)


@njit(parallel=True, cache=True)
def pack_tq1_0(raw, codes, d16):
    """raw (nb * 54,) uint8 <- TQ1_0 blocks of ternary codes (nb * 256,) int8 with block scales d16 (nb,)."""
    for b in prange(d16.shape[0]):
        p, o = b * TQ1_BYTES, b * QK
        for at, first, nbytes, digits in TQ1_GROUPS:
            for m in range(nbytes):
                v = 0
                for j in range(digits):
                    v = 3 * v + np.int64(codes[o + first + m + nbytes * j]) + 1
                for j in range(digits, 5):   # qh's 4 digits sit in the top of a 5-digit number
                    v *= 3
                raw[p + at + m] = (v * 256 + 242) // 243
        raw[p + 52] = d16[b] & 255
        raw[p + 53] = d16[b] >> 8


@njit(parallel=True, cache=True)
def dequantize_tq1_0(out, raw, f16):
    """out (nb * 256,) float32 <- d * (q - 1) of TQ1_0 blocks raw (nb * 54,) uint8."""
    for b in prange(out.shape[0] // QK):
        p, o = b * TQ1_BYTES, b * QK
        d = f16[np.int64(raw[p + 52]) | (np.int64(raw[p + 53]) << 8)]
        for at, first, nbytes, digits in TQ1_GROUPS:
            for m in range(nbytes):
                byte = np.int64(raw[p + at + m])
                pow3 = 1
                for j in range(digits):
                    q = (((byte * pow3) & 255) * 3) >> 8
                    out[o + first + m + nbytes * j] = d * np.float32(q - 1)
                    pow3 *= 3
