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
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils
from numba.extending import intrinsic

from .matmul import matmul_backward, matmul_forward
from .quant import _AVX2, _I8, _I16, _I32, _consts, _load, _vec   # the LLVM IR helpers the integer dots share

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


# The row dot (decoding: matmul_t2, and the fused decoder's per-row dispatch, decode.py).
# Stored codes are q = code + 1 in {0, 1, 2}, so a row . int8 activations x is
#     sum(code * x) = sum(q * x) - sum(x)
# with sum(x) computed once per activation row by the quantiser. q * x fits a signed 16-bit
# product of an unsigned byte and a signed byte: the vector loop takes 32 weight bytes
# (128 weights) per step, unpacks each of the four planes to 32 bytes of q (shift, mask),
# multiplies them with the plane's 32 activation bytes and adds neighbouring products into
# 16-bit lanes (AVX2's vpmaddubsw; |q*x + q*x| <= 512, the four planes' sum <= 2048: no
# saturation), then adds neighbouring 16-bit lanes into eight 32-bit lanes (vpmaddwd with
# ones). LLVM does not find vpmaddubsw in generic IR here (it proves the 2-bit q small and
# drops the saturation the pattern needs), so on an AVX2 host the loop calls the x86
# intrinsics; elsewhere the same sums are written in generic vector IR (widen, multiply, add
# neighbours) for LLVM to lower to what the target has. Integers throughout: both give the
# exact sum. A row whose byte count is not a multiple of 32 finishes in a scalar loop.
# Like ggml's integer dots (quant.qdot) it takes several rows per pass over the activation.
T2_CODE = 16    # the fused decoder's weight code for T2 rows (quant.QDOT_CODES are 0..3)
T2_CHUNK = 32   # weight bytes per step of the vector loop


def _pairs(builder, v, t):
    """Neighbouring lanes of integer vector v added, widened (sign-extended) to lanes of t."""
    n = v.type.count
    w = builder.sext(v, _vec(t, n)) if v.type.element != t else v
    return builder.add(builder.shuffle_vector(w, w, _consts(_I32, range(0, n, 2))),
                       builder.shuffle_vector(w, w, _consts(_I32, range(1, n, 2))))


def _maddubs_generic(builder, q, x):
    """<32 x i8> q (unsigned) and x (signed) -> <16 x i16>: q*x of neighbours added."""
    p = builder.mul(builder.zext(q, _vec(_I16, 32)), builder.sext(x, _vec(_I16, 32)))
    return _pairs(builder, p, _I16)


def _maddubs_avx2(builder, q, x):
    fn = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw",
                                          fnty=ir.FunctionType(_vec(_I16, 16), [_vec(_I8, 32)] * 2))
    return builder.call(fn, [q, x])


def _pairs32_avx2(builder, v):
    fn = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd",
                                          fnty=ir.FunctionType(_vec(_I32, 8), [_vec(_I16, 16)] * 2))
    return builder.call(fn, [v, _consts(_I16, [1] * 16)])


def _t2_rows_intrinsic(avx2: bool):
    """An intrinsic f(w, rows, a, ad, asum) -> R float32s: rows (a tuple of R indices) of the
    T2 matrix w (OC, K + 2) uint8 . the int8 activation codes a (4K,) with scale ad[0] and
    code sum asum[0]: per row d * float(sum over k, l of q_l(w[r, k]) * a[l*K + k] - asum[0])
    * ad[0], d the row's f16 scale. The R rows share one loop over 32-byte steps (each
    activation load serves all R; R independent accumulator chains), then a scalar loop over
    the bytes past the last whole step. Reads w and a unchecked."""
    maddubs = _maddubs_avx2 if avx2 else _maddubs_generic

    @intrinsic
    def t2_rows(typingctx, w, rows, a, ad, asum):
        R = rows.count

        def codegen(context, builder, sig, args):
            wa = context.make_array(sig.args[0])(context, builder, args[0])
            stride = cgutils.unpack_tuple(builder, wa.strides)[0]
            base = builder.bitcast(wa.data, _I8.as_pointer())
            wrows = [builder.gep(base, [builder.mul(r, stride)]) for r in cgutils.unpack_tuple(builder, args[1])]
            aa = context.make_array(sig.args[2])(context, builder, args[2])
            ap = aa.data
            K = builder.udiv(cgutils.unpack_tuple(builder, aa.shape)[0], ir.Constant(stride.type, 4))
            n = builder.udiv(K, ir.Constant(K.type, T2_CHUNK))
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_I32, 8), [0] * 8)) for _ in range(R)]
            with cgutils.for_range(builder, n) as loop:
                k = builder.mul(loop.index, ir.Constant(K.type, T2_CHUNK))
                packed = [_load(builder, wr, k, _vec(_I8, T2_CHUNK)) for wr in wrows]
                s16 = [None] * R
                for l in range(4):
                    x = _load(builder, ap, builder.add(k, builder.mul(K, ir.Constant(K.type, l))), _vec(_I8, 32))
                    for j in range(R):
                        q = builder.and_(builder.lshr(packed[j], _consts(_I8, [2 * l] * 32)), _consts(_I8, [3] * 32))
                        m = maddubs(builder, q, x)
                        s16[j] = m if s16[j] is None else builder.add(s16[j], m)
                for j in range(R):
                    s32 = _pairs32_avx2(builder, s16[j]) if avx2 else _pairs(builder, s16[j], _I32)
                    builder.store(builder.add(builder.load(acc[j]), s32), acc[j])
            isum = []
            for j in range(R):
                lanes = builder.load(acc[j])
                total = builder.extract_element(lanes, ir.Constant(_I32, 0))
                for i in range(1, 8):
                    total = builder.add(total, builder.extract_element(lanes, ir.Constant(_I32, i)))
                isum.append(cgutils.alloca_once_value(builder, total))
            k0 = builder.mul(n, ir.Constant(K.type, T2_CHUNK))
            with cgutils.for_range(builder, builder.sub(K, k0)) as loop:   # the bytes past the last step
                k = builder.add(k0, loop.index)
                x = [builder.sext(_load(builder, ap, builder.add(k, builder.mul(K, ir.Constant(K.type, l))), _I8),
                                  _I32) for l in range(4)]
                for j in range(R):
                    byte = builder.zext(_load(builder, wrows[j], k, _I8), _I32)
                    t = builder.load(isum[j])
                    for l in range(4):
                        q = builder.and_(builder.lshr(byte, ir.Constant(_I32, 2 * l)), ir.Constant(_I32, 3))
                        t = builder.add(t, builder.mul(q, x[l]))
                    builder.store(t, isum[j])
            ad_p, asum_p = (context.make_array(t)(context, builder, v).data for t, v in zip(sig.args[3:], args[3:]))
            scale, total = builder.load(ad_p), builder.load(asum_p)
            out = []
            for j in range(R):
                d = builder.fpext(builder.bitcast(_load(builder, wrows[j], K, _I16), ir.HalfType()), ir.FloatType())
                dot = builder.sitofp(builder.sub(builder.load(isum[j]), total), ir.FloatType())
                out.append(builder.fmul(builder.fmul(d, dot), scale))
            return context.make_tuple(builder, sig.return_type, out)
        return numba.types.UniTuple(numba.types.float32, R)(w, rows, a, ad, asum), codegen
    return t2_rows


_t2_rows_generic = _t2_rows_intrinsic(False)
_t2_rows = _t2_rows_intrinsic(True) if _AVX2 else _t2_rows_generic


@njit(cache=True, inline="always")
def t2dot(w, rows, a, ad, asum):
    """Rows `rows` (a tuple of 1 to 4 indices) of T2 matrix w (OC, C/4 + 2) . int8
    activation codes a (C,) with scale ad[0] = max|x|/127 and code sum asum[0]
    (quantize_row_t2): per row d * (sum(q * a) - sum(a)) * ad[0], as a tuple of float32s.
    Unchecked: w's rows must hold C/4 + 2 bytes."""
    return _t2_rows(w, rows, a, ad, asum)


@njit(parallel=True, cache=True)
def t2_codes_valid(w):
    """Whether every 2-bit field in the code bytes of T2 rows w (R, C/4 + 2) holds 0, 1 or 2
    (a field of 3 is no ternary code; the kernels would multiply by 2). One pass, parallel."""
    K = w.shape[1] - 2
    bad = 0
    for r in prange(w.shape[0]):
        for k in range(K):
            bad += (w[r, k] & (w[r, k] >> 1) & 0x55) != 0   # both bits of a field set
    return bad == 0


@njit(cache=True)
def quantize_row_t2(q, xd, xs, x):
    """BitNet's per-token activation quantiser on one row x (C,) float32: a = max(max|x|,
    EPS), codes q (C,) int8 = clip(rint(x * 127 / a), -128, 127), xd[0] = a / 127, xs[0] =
    the codes' sum (what the +1 offset of the stored weight codes adds to a row dot)."""
    a = np.float32(EPS)
    for c in range(x.shape[0]):
        a = max(a, abs(x[c]))
    inv = np.float32(127.0) / a
    xd[0] = a / np.float32(127.0)
    total = 0
    for c in range(x.shape[0]):
        v = min(max(np.rint(x[c] * inv), -128.0), 127.0)
        q[c] = np.int8(v)
        total += np.int64(v)
    xs[0] = total


@njit(parallel=True, cache=True)
def act_quant_int8(q, xs, qsum, x):
    """quantize_row_t2 on every row of x (N, C): codes q (N, C) int8, scales xs (N,), code sums qsum (N,)."""
    for n in prange(x.shape[0]):
        quantize_row_t2(q[n], xs[n:n + 1], qsum[n:n + 1], x[n])


@njit(parallel=True, cache=True)
def matmul_t2(out, q, xs, qsum, w):
    """out (N, OC) = (q (N, C) * xs) @ W^T for W (OC, C) stored as T2 rows w (OC, C/4 + 2),
    q, xs, qsum from act_quant_int8: one t2dot per output (an exact integer sum, then the
    row scale, then the activation scale). Parallel over rows, each read once for all N."""
    for oc in prange(w.shape[0]):
        for n in range(q.shape[0]):
            out[n, oc] = t2dot(w, (oc,), q[n], xs[n:n + 1], qsum[n:n + 1])[0]


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
