"""ggml's quantised block formats: dequantisers, quantisers, and matmul straight on blocks.

Every format stores a tensor's elements in order, fastest axis first, cut into blocks of
`block_size` elements that take `type_size` bytes each (little-endian):

  type   block  bytes  layout (offsets in bytes)                         element value
  Q4_0     32     18   d f16 | qs[16] (nibbles)                          d * (q - 8)
  Q4_1     32     20   d f16 | m f16 | qs[16]                            d * q + m
  Q5_0     32     22   d f16 | qh u32 | qs[16]                           d * (q - 16)
  Q5_1     32     24   d f16 | m f16 | qh u32 | qs[16]                   d * q + m
  Q8_0     32     34   d f16 | qs[32] int8                               d * q
  Q2_K    256     84   scales[16] | qs[64] | d f16 | dmin f16            (d*sc) * q - (dmin*m)
  Q3_K    256    110   hmask[32] | qs[64] | scales[12] | d f16           (d*sc) * q
  Q4_K    256    144   d f16 | dmin f16 | scales[12] | qs[128]           (d*sc) * q - (dmin*m)
  Q5_K    256    176   d f16 | dmin f16 | scales[12] | qh[32] | qs[128]  (d*sc) * q - (dmin*m)
  Q6_K    256    210   ql[128] | qh[64] | scales[16] int8 | d f16        (d*sc) * q

In the 32-element formats byte j of qs holds element j in its low nibble and element
j + 16 in its high nibble; Q5's 5th bits are bit j of qh. The K-quants ("super-blocks")
carry one scale (and min) per sub-block of 16 or 32 elements; the exact bit positions are
spelled out in each kernel. Products are formed in float32 in the same order as ggml, so
the results are bit-identical to ggml's (and the `gguf` package's) dequantisers.

Kernels read raw bytes (uint8 arrays, any alignment) and assemble multi-byte fields with
shifts, so they are independent of the host's byte order and of the file's alignment.
f16 values are decoded through a 65536-entry table (`F16_TABLE`), exact by construction.
"""
import numba
import numpy as np
from llvmlite import binding as llvm_binding, ir
from numba import njit, prange
from numba.core import cgutils
from numba.extending import intrinsic

QK = 32      # elements per block of the 32-element formats
QK_K = 256   # elements per K-quant super-block

# every half-precision bit pattern -> its float32 value (NumPy's conversion is exact)
F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True)
def _f16(raw, i, f16):
    return f16[np.int64(raw[i]) | (np.int64(raw[i + 1]) << 8)]


@njit(cache=True)
def _u32(raw, i):
    return (np.int64(raw[i]) | (np.int64(raw[i + 1]) << 8) | (np.int64(raw[i + 2]) << 16)
            | (np.int64(raw[i + 3]) << 24))


# ---------------------------------------------------------------------- plain float formats

@njit(parallel=True, cache=True)
def dequantize_f16(out, raw, f16):
    """out (n,) float32 <- raw (2n,) bytes of little-endian IEEE halves."""
    for i in prange(out.shape[0]):
        out[i] = _f16(raw, 2 * i, f16)


@njit(parallel=True, cache=True)
def dequantize_bf16(out, raw, f16):
    """out (n,) uint32 <- float32 bit patterns of raw (2n,) bytes of bfloat16 (the top half
    of a float32). The caller passes its float32 output viewed as uint32: a view taken
    inside a parallel kernel does not alias reliably in Numba (measured: writes were lost)."""
    for i in prange(out.shape[0]):
        out[i] = np.uint32((np.int64(raw[2 * i]) | (np.int64(raw[2 * i + 1]) << 8)) << 16)


@njit(parallel=True, cache=True)
def quantize_bf16(out, bits):
    """out (n,) uint16 <- bf16 of the float32 bit patterns bits (n,) uint32 (a view of the
    float32 input), rounding to nearest even; NaNs stay quiet NaNs."""
    for i in prange(bits.shape[0]):
        n = np.int64(bits[i])
        if (n & 0x7FFFFFFF) > 0x7F800000:
            n = (n & 0xFFFF0000) | (64 << 16)
        out[i] = np.uint16((n + 0x7FFF + ((n >> 16) & 1)) >> 16)


# ---------------------------------------------------------------------- 32-element blocks

@njit(parallel=True, cache=True)
def dequantize_q4_1(out, raw, f16):
    for b in prange(out.shape[0] // QK):
        p, o = b * 20, b * QK
        d, m = _f16(raw, p, f16), _f16(raw, p + 2, f16)
        for j in range(16):
            x = np.int64(raw[p + 4 + j])
            out[o + j] = d * np.float32(x & 15) + m
            out[o + j + 16] = d * np.float32(x >> 4) + m


@njit(parallel=True, cache=True)
def dequantize_q5_1(out, raw, f16):
    for b in prange(out.shape[0] // QK):
        p, o = b * 24, b * QK
        d, m = _f16(raw, p, f16), _f16(raw, p + 2, f16)
        qh = _u32(raw, p + 4)
        for j in range(16):
            x = np.int64(raw[p + 8 + j])
            lo = (x & 15) | (((qh >> j) & 1) << 4)
            hi = (x >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[o + j] = d * np.float32(lo) + m
            out[o + j + 16] = d * np.float32(hi) + m


# ---------------------------------------------------------------------- K-quant super-blocks

@njit(parallel=True, cache=True)
def dequantize_q2_k(out, raw, f16):
    """16 sub-blocks of 16; scales[g] = sc (low nibble) | m (high nibble); 2-bit q.
    Element e = n*128 + s*32 + t (n < 2, s < 4, t < 32) is bits 2s..2s+1 of qs[n*32 + t]."""
    for b in prange(out.shape[0] // QK_K):
        p, o = b * 84, b * QK_K
        d, dmin = _f16(raw, p + 80, f16), _f16(raw, p + 82, f16)
        for e in range(QK_K):
            n, s, t = e >> 7, (e >> 5) & 3, e & 31
            sc = np.int64(raw[p + (e >> 4)])
            q = (np.int64(raw[p + 16 + n * 32 + t]) >> (2 * s)) & 3
            out[o + e] = (d * np.float32(sc & 15)) * np.float32(q) - dmin * np.float32(sc >> 4)


@njit(parallel=True, cache=True)
def dequantize_q3_k(out, raw, f16):
    """16 sub-blocks of 16 with 6-bit signed scales (stored +32): the low 4 bits of scale i
    are nibble i//8 of scales[i%8], the high 2 bits are bits 2*(i//4).. of scales[8 + i%4].
    q = (2 low bits as in Q2_K) - 4 unless bit n*4+s of hmask[t] is set."""
    for b in prange(out.shape[0] // QK_K):
        p, o = b * 110, b * QK_K
        d = _f16(raw, p + 108, f16)
        for e in range(QK_K):
            n, s, t, i = e >> 7, (e >> 5) & 3, e & 31, e >> 4
            lo = (np.int64(raw[p + 96 + (i & 7)]) >> (4 * (i >> 3))) & 15
            hi = (np.int64(raw[p + 104 + (i & 3)]) >> (2 * (i >> 2))) & 3
            sc = (lo | (hi << 4)) - 32
            q = (np.int64(raw[p + 32 + n * 32 + t]) >> (2 * s)) & 3
            if not (np.int64(raw[p + t]) >> (n * 4 + s)) & 1:
                q -= 4
            out[o + e] = (d * np.float32(sc)) * np.float32(q)


@njit(cache=True)
def _scale_min_k4(raw, p, g):
    """Q4_K/Q5_K 6-bit scale and min of sub-block g (< 8) from the 12 bytes at raw[p]."""
    if g < 4:
        return np.int64(raw[p + g]) & 63, np.int64(raw[p + g + 4]) & 63
    sc = (np.int64(raw[p + g + 4]) & 15) | ((np.int64(raw[p + g - 4]) >> 6) << 4)
    m = (np.int64(raw[p + g + 4]) >> 4) | ((np.int64(raw[p + g]) >> 6) << 4)
    return sc, m


@njit(parallel=True, cache=True)
def dequantize_q5_k(out, raw, f16):
    """As Q4_K, plus a 5th bit: bit g of qh[t] for element t of sub-block g."""
    for b in prange(out.shape[0] // QK_K):
        p, o = b * 176, b * QK_K
        d, dmin = _f16(raw, p, f16), _f16(raw, p + 2, f16)
        for g in range(8):
            sc, m = _scale_min_k4(raw, p + 4, g)
            dl, ml = d * np.float32(sc), dmin * np.float32(m)
            c, k = g >> 1, g & 1
            for t in range(32):
                q = (np.int64(raw[p + 48 + c * 32 + t]) >> (4 * k)) & 15
                q |= ((np.int64(raw[p + 16 + t]) >> g) & 1) << 4
                out[o + g * 32 + t] = dl * np.float32(q) - ml


# ---------------------------------------------------------------------- quantisers

@njit(inline="always")
def _q8_scale(x, o, n):
    """(d, 1/d) of the n values of x from o, ggml's Q8 rule: d = max|x| / 127 (1/d = 0 for zeros)."""
    amax = np.float32(0.0)
    for j in range(n):
        amax = max(amax, abs(x[o + j]))
    d = amax / np.float32(127.0)
    return d, (np.float32(1.0) / d if d != 0 else np.float32(0.0))


@njit(inline="always")
def _round_half_away(v):
    """roundf(v) in float32: halves away from zero, as ggml rounds."""
    a = abs(v)
    r = np.floor(a) + np.floor(np.float32(2.0) * (a - np.floor(a)))
    return -r if v < 0 else r


@njit(parallel=True, cache=True)
def quantize_q8_0(raw, d_out, x):
    """Q8_0 blocks of x (nb*32,) as ggml does: d = max|x| / 127, q = round-half-away(x / d).

    Writes the int8 q's into raw (nb*34,) and d as float32 into d_out (nb,); the caller
    stores d as f16 in each block's first two bytes (exact rounding is NumPy's job)."""
    for b in prange(x.shape[0] // QK):
        o, p = b * QK, b * 34
        d, inv = _q8_scale(x, o, QK)
        d_out[b] = d
        for j in range(QK):
            q = np.int64(_round_half_away(x[o + j] * inv))
            raw[p + 2 + j] = np.uint8(q & 255)


@njit(parallel=True, cache=True)
def quantize_q4_0(raw, d_out, x):
    """Q4_0 blocks as ggml does: m = the element of largest magnitude (with its sign),
    d = m / -8, q = min(15, trunc(x / d + 8.5)). Same contract as quantize_q8_0 (18-byte blocks)."""
    for b in prange(x.shape[0] // QK):
        o, p = b * QK, b * 18
        m = x[o]
        for j in range(1, QK):
            if abs(x[o + j]) > abs(m):
                m = x[o + j]
        d = m / np.float32(-8.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        d_out[b] = d
        for j in range(16):
            lo = min(15, max(0, np.int64(x[o + j] * inv + np.float32(8.5))))
            hi = min(15, max(0, np.int64(x[o + j + 16] * inv + np.float32(8.5))))
            raw[p + 2 + j] = np.uint8(lo | (hi << 4))


# ---------------------------------------------------------------------- matmul on blocks

@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def matmul_q8_0(out, x, w, f16, scratch):
    """out (N, OC) = x (N, C) @ W^T with W stored as Q8_0 rows w (OC, C/32*34) uint8.

    Parallel over output rows; blocks are decoded where they are used and the matrix is
    never expanded. Each thread sums into its own 32 lanes (scratch (threads, 32) float32,
    row numba.get_thread_id()): lane j += d * q_j * x_j over all blocks, one horizontal
    sum per output instead of one per block (2.5x faster, measured). fastmath reassoc
    lets the lane loop vectorise (tested against dequantise-then-matmul)."""
    N, C = x.shape
    for oc in prange(w.shape[0]):
        acc = scratch[numba.get_thread_id()]
        row = w[oc]
        for n in range(N):
            xn = x[n]
            acc[:] = 0.0
            for b in range(C // QK):
                p = b * 34
                d = _f16(row, p, f16)
                for j in range(QK):
                    acc[j] += d * (np.float32(np.int8(row[p + 2 + j])) * xn[b * QK + j])
            out[n, oc] = acc.sum()


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def matmul_q4_0(out, x, w, f16, scratch):
    """As matmul_q8_0 for Q4_0 rows w (OC, C/32*18)."""
    N, C = x.shape
    for oc in prange(w.shape[0]):
        acc = scratch[numba.get_thread_id()]
        row = w[oc]
        for n in range(N):
            xn = x[n]
            acc[:] = 0.0
            for b in range(C // QK):
                p = b * 18
                d = _f16(row, p, f16)
                for j in range(16):
                    q = np.int32(row[p + 2 + j])
                    acc[j] += d * (np.float32((q & 15) - 8) * xn[b * QK + j])
                    acc[j + 16] += d * (np.float32((q >> 4) - 8) * xn[b * QK + j + 16])
            out[n, oc] = acc.sum()



# ---------------------------------------------------------------------- integer dot products
# The fast engines' way (llama.cpp's vec_dot): quantise the activation row once per matmul
# to int8 with one float32 scale per QA elements (quantize_rows_q8), then meet each weight
# block with integer dot products (int8 / int6 / int4 x int8, summed in int32) and one
# float multiply per block pair.
#
#   weight  code  block  QA    per block pair (da: the activation block's scale)
#   Q8_0      0     32    32   dw * da * sum(q * a)
#   Q4_0      1     32    32   dw * da * sum((q - 8) * a)
#   Q4_K      2    256   256   (d*da) * sum_g sc_g*sum(q*a) - (dmin*da) * sum_g m_g*asum_g
#   Q6_K      3    256   256   (d*da) * sum_i sc_i * sum((q - 32) * a)
#   Q5_0      4     32    32   dw * da * sum((q - 16) * a)
# asum_g: the sum of the int8 activations of 32-element group g (from quantize_rows_q8).
#
# Numba types integer arithmetic as int64 and fully unrolls 32-long loops before LLVM's
# loop vectoriser sees them (measured: 32 scalar imul per block). So the dots are an LLVM
# intrinsic (qdot) written here in vector IR: a loop over blocks for R weight rows at once
# (they share each activation load and their accumulation chains overlap), 8 float lanes
# per row (as llama.cpp's AVX2 code keeps):
#     q (32 x u8: Q4 nibbles, Q5 / Q6 5- / 6-bit values; Q8_0 as |q| with sign(q) moved onto a),
#     a (32 x i8) -> vpmaddubsw: neighbouring products summed into 16 x i16 (the offset of
#     Q4_0 / Q5_0 / Q6_K, 8 . a, 16 . a or 32 . a, subtracted there) -> vpmaddwd with ones (Q4_K / Q6_K:
#     with the sub-block scales): 8 x i32, lane j = elements 4j .. 4j+3 (summed over the
#     super-block for the K-quants) -> 8 x f32, times the block pair's float scale (an f16
#     widened as a vector: the scalar widening LLVM picks waited on the accumulator,
#     measured 1.9x slower), added to the lanes
# and one ordered sum of the 8 lanes at the end. No int16 sum can saturate: |q| <= 128 and
# |a| <= 127 (the quantiser's range). On an AVX2 host vpmaddubsw / vpsignb are called by
# name; elsewhere (or with NUMBA_CPU_NAME set) generic IR computes the same integers, which
# LLVM lowers for that target: the results are the same bits either way. No AVX-512 VNNI
# path: there is no such machine here to measure one on. The float order is fixed (no
# fastmath): results are bit-exact against a NumPy reference of this arithmetic
# (tests/infer/test_qdot.py, which also runs the generic IR).
# The intrinsics read memory unchecked: callers validate shapes at the Python boundary.

QDOT_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_K": 2, "Q6_K": 3, "Q5_0": 4}
QDOT_BLOCK = (QK, QK, QK_K, QK_K, QK)        # weight elements per block (= activation block QA)
QDOT_TYPE_SIZE = (34, 18, 144, 210, 22)      # weight bytes per block

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()

# AVX2's byte multiply-add (vpmaddubsw) and byte sign (vpsignb) are called by name where Numba
# compiles for an AVX2 host; elsewhere the same integers come from generic IR (_maddubs, _sign).
_AVX2 = (numba.config.CPU_NAME is None and bool(llvm_binding.get_host_cpu_features().get("avx2")))


def _vec(t, n):
    return ir.VectorType(t, n)


def _consts(t, values):
    values = list(values)
    return ir.Constant(_vec(t, len(values)), values)


def _load(builder, base, off, t):
    """The value of IR type t at byte offset `off` of pointer `base`, unaligned."""
    p = builder.gep(builder.bitcast(base, _I8.as_pointer()), [off])
    return builder.load(builder.bitcast(p, t.as_pointer()), align=1)


def _x86_call(builder, name, ret, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [v.type for v in args]), name)
    return builder.call(fn, args)


def _maddubs(builder, u, s):
    """u, s <32 x i8>, u unsigned, s signed -> <16 x i16>: u[2k]*s[2k] + u[2k+1]*s[2k+1].
    Callers keep the sums within int16 (then no saturation: exact)."""
    if _AVX2:
        return _x86_call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), u, s)
    p = builder.mul(builder.zext(u, _vec(_I32, 32)), builder.sext(s, _vec(_I32, 32)))
    pairs = builder.add(builder.shuffle_vector(p, p, _consts(_I32, range(0, 32, 2))),
                        builder.shuffle_vector(p, p, _consts(_I32, range(1, 32, 2))))
    return builder.trunc(pairs, _vec(_I16, 16))


def _sign(builder, a, b):
    """a * sign(b) per byte (<32 x i8>; -(-128) wraps to -128, i.e. 128 read unsigned)."""
    if _AVX2:
        return _x86_call(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), a, b)
    zero = _consts(_I8, [0] * 32)
    neg = builder.select(builder.icmp_signed("<", b, zero), builder.sub(zero, a), a)
    return builder.select(builder.icmp_signed("==", b, zero), zero, neg)


def _maddwd(builder, x, y):
    """x, y <16 x i16> -> <8 x i32>: x[2j]*y[2j] + x[2j+1]*y[2j+1] (LLVM emits vpmaddwd)."""
    p = builder.mul(builder.sext(x, _vec(_I32, 16)), builder.sext(y, _vec(_I32, 16)))
    return builder.add(builder.shuffle_vector(p, p, _consts(_I32, range(0, 16, 2))),
                       builder.shuffle_vector(p, p, _consts(_I32, range(1, 16, 2))))


def _ones16():
    return _consts(_I16, [1] * 16)


def _splat(builder, x, n=8):
    v = builder.insert_element(ir.Constant(_vec(x.type, n), ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [0] * n))


def _half(builder, base, off):
    """The little-endian IEEE half at byte `off` as float32 (exact)."""
    return builder.fpext(builder.bitcast(_load(builder, base, off, _I16), ir.HalfType()), _F32)


def _half8(builder, base, off):
    """The half at byte `off` as 8 float32 lanes (exact). Widened as a vector: LLVM's scalar
    lowering inserts the half into whatever register is free, often the accumulator, which
    made each block wait for the previous one."""
    h = _splat(builder, _load(builder, base, off, _I16))
    return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), 8)), _vec(_F32, 8))


def _nibbles(builder, v, shift, mask):
    n = v.type.count
    return builder.and_(builder.lshr(v, _consts(_I8, [shift] * n)), _consts(_I8, [mask] * n))


def _idx(builder, i, k):
    return builder.add(i, ir.Constant(i.type, k)) if k else i


_PREFETCH_GROUPS = 2   # how many groups of R rows ahead the loop over blocks prefetches


def _prefetch_ahead(builder, row0, R, stride, b, type_size):
    """Ask for the bytes of the rows _PREFETCH_GROUPS * R rows on that block b's share of one
    linear sweep covers: R * type_size bytes per block, so over a group's loop over blocks the
    prefetches walk the later group's rows (consecutive in a matrix) front to back, one
    sequential stream. Prefetching block b of each of the next group's rows instead (R
    interleaved streams, which then met R more from the rows being read) kept a 49152-row
    Q8_0 classifier at 11 GB/s from memory; the sweep reads it at ~20, the plain read rate
    (measured in docs/inference.md, "Prefetch"). A prefetch never faults: past the matrix's
    end, or for rows that are not consecutive, it is only a wasted hint."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    at = builder.add(builder.mul(stride, ir.Constant(stride.type, R * _PREFETCH_GROUPS)),
                     builder.mul(b, ir.Constant(b.type, R * type_size)))
    for off in range(0, R * type_size, 64):
        builder.call(fn, [builder.gep(row0, [_idx(builder, at, off)]), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                          ir.Constant(_I32, 1)])


def _rows_intrinsic(block, type_size):
    """An intrinsic f(w, rows, a, ad, asum, nb) -> R float32s: rows (a tuple of R indices)
    of the weight matrix w (OC, bytes), each nb blocks, . the int8 activation row a with
    block scales ad and group sums asum. block(builder, ptrs, b, acc, macc) emits one block's
    work for one row: adds to its 8 float lanes acc and scalar macc. The R rows run in one
    loop over blocks: each activation load (and any work on it alone) serves all R, and the
    R accumulation chains overlap. Each row's arithmetic is the one-row arithmetic."""
    @intrinsic
    def rows_dot(typingctx, w, rows, a, ad, asum, nb):
        R = rows.count

        def codegen(context, builder, sig, args):
            wa = context.make_array(sig.args[0])(context, builder, args[0])
            stride = cgutils.unpack_tuple(builder, wa.strides)[0]
            base = builder.bitcast(wa.data, _I8.as_pointer())
            ptrs = [context.make_array(t)(context, builder, v).data for t, v in zip(sig.args[2:5], args[2:5])]
            wrows = [builder.gep(base, [builder.mul(r, stride)]) for r in cgutils.unpack_tuple(builder, args[1])]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), [0.0] * 8)) for _ in range(R)]
            macc = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(R)]
            nblocks = context.cast(builder, args[5], sig.args[5], numba.types.intp)
            with cgutils.for_range(builder, nblocks) as loop:
                _prefetch_ahead(builder, wrows[0], R, stride, loop.index, type_size)
                for k in range(R):
                    block(builder, [wrows[k]] + ptrs, loop.index, acc[k], macc[k])
            out = []
            for k in range(R):
                lanes = builder.load(acc[k])
                total = builder.extract_element(lanes, ir.Constant(_I32, 0))
                for j in range(1, 8):
                    total = builder.fadd(total, builder.extract_element(lanes, ir.Constant(_I32, j)))
                out.append(builder.fsub(total, builder.load(macc[k])))
            return context.make_tuple(builder, sig.return_type, out)
        return numba.types.UniTuple(numba.types.float32, R)(w, rows, a, ad, asum, nb), codegen
    return rows_dot


def _add_lanes(builder, acc, isum, scale):
    """acc += float(isum) * scale (8 lanes each)."""
    term = builder.fmul(builder.sitofp(isum, _vec(_F32, 8)), scale)
    builder.store(builder.fadd(builder.load(acc), term), acc)


def _block_32(nbytes, lanes):
    def block(builder, ptrs, b, acc, macc):
        w, a, ad, _ = ptrs
        p = builder.mul(b, ir.Constant(b.type, nbytes))
        x = _load(builder, a, builder.mul(b, ir.Constant(b.type, QK)), _vec(_I8, 32))
        scale = builder.fmul(_half8(builder, w, p), _splat(builder, builder.load(builder.gep(ad, [b]))))
        _add_lanes(builder, acc, lanes(builder, w, _idx(builder, p, 2), x), scale)
    return block


def _lanes_q8_0(builder, w, at, x):
    """sum(q * x) as |q| . (x * sign(q)): unsigned x signed bytes, the only 8-bit multiply there is."""
    q = _load(builder, w, at, _vec(_I8, 32))
    return _maddwd(builder, _maddubs(builder, _sign(builder, q, q), _sign(builder, x, q)), _ones16())


def _q4_0_quants(builder, w, at):
    """Q4_0's 32 unsigned quants from the 16 bytes at `at`: element j is the low nibble of
    byte j, element j + 16 its high nibble. The 16 bytes are loaded into both 128-bit halves
    (vbroadcasti128), the upper half shifted right by 4 (vpsrlvq: a shift per 64-bit lane),
    then masked: two vector instructions where shifting, masking both halves and inserting
    one into the other took four (the Q4_0 row dot 1.73 -> 1.48 ns per 32 weights)."""
    i64x4 = _vec(ir.IntType(64), 4)
    packed = _load(builder, w, at, _vec(_I8, 16))
    both = builder.bitcast(builder.shuffle_vector(packed, packed, _consts(_I32, list(range(16)) * 2)), i64x4)
    shifted = builder.lshr(both, ir.Constant(i64x4, [0, 0, 4, 4]))
    return builder.and_(builder.bitcast(shifted, _vec(_I8, 32)), _consts(_I8, [15] * 32))


def _q5_0_quants(builder, w, at):
    """Q5_0's 32 unsigned 5-bit quants from qh (u32 at `at`) and 16 nibble bytes after it:
    Q4_0's nibbles, plus 16 where bit j of qh is set. Byte j of a broadcast of qh's byte j//8,
    masked with bit j%8 and compared (vpshufb, vpand, vpcmpeqb): x86 has no per-byte shift."""
    qh = _load(builder, w, at, _vec(_I8, 4))
    spread = builder.shuffle_vector(qh, qh, _consts(_I32, [j // 8 for j in range(32)]))
    bit = _consts(_I8, [(1 << (j % 8)) - (256 if j % 8 == 7 else 0) for j in range(32)])   # i8 two's complement
    set_ = builder.icmp_unsigned("==", builder.and_(spread, bit), bit)
    high = builder.select(set_, _consts(_I8, [16] * 32), _consts(_I8, [0] * 32))
    return builder.or_(_q4_0_quants(builder, w, _idx(builder, at, 4)), high)


def _lanes_offset(quants, offset):
    """Lanes of a 32-element format whose quants are unsigned with an offset (Q4_0: 8, Q5_0:
    16): sum((q - offset) * x) as q . x - offset . x in int16 pairs."""
    def lanes(builder, w, at, x):
        q = quants(builder, w, at)
        pairs = builder.sub(_maddubs(builder, q, x), _maddubs(builder, _consts(_I8, [offset] * 32), x))
        return _maddwd(builder, pairs, _ones16())
    return lanes


def _byte(builder, w, at):
    return builder.zext(_load(builder, w, at, _I8), _I32)


def _scale_min_k4_ir(builder, sb, g):
    """Q4_K's 6-bit (scale, min) of group g from the 12 scale bytes sb (as _scale_min_k4)."""
    c63, c15, c6, c4 = (ir.Constant(_I32, v) for v in (63, 15, 6, 4))
    if g < 4:
        return builder.and_(sb[g], c63), builder.and_(sb[g + 4], c63)
    return (builder.or_(builder.and_(sb[g + 4], c15), builder.shl(builder.lshr(sb[g - 4], c6), c4)),
            builder.or_(builder.lshr(sb[g + 4], c4), builder.shl(builder.lshr(sb[g], c6), c4)))


def _scales_mins_k4(builder, w, p):
    """The 6-bit scales and mins of the Q4_K super-block at byte p as <16 x i8> [sc0 .. sc7,
    m0 .. m7] (as _scale_min_k4 for each group), unpacked from its 12 scale bytes at p + 4 in
    a few byte-vector operations instead of ~40 scalar ones per row and super-block."""
    raw = _load(builder, w, _idx(builder, p, 4), _vec(_I8, 16))   # the 12 scale bytes and 4 of qs (unused)
    # low bits: sc_g = b[g] & 63, m_g = b[g + 4] & 63 (g < 4); sc_g = b[g + 4] & 15, m_g = b[g + 4] >> 4 (g >= 4)
    low_src = builder.shuffle_vector(raw, raw, _consts(_I32, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]))
    low = builder.shuffle_vector(builder.and_(low_src, _consts(_I8, [63] * 4 + [15] * 4 + [63] * 4 + [0] * 4)),
                                 _nibbles(builder, low_src, 4, 15), _consts(_I32, list(range(12)) + [28, 29, 30, 31]))
    # high bits (g >= 4): the top two bits of b[g - 4] (scales) and of b[g] (mins), moved to bits 4-5
    high_src = builder.shuffle_vector(raw, raw, _consts(_I32, [0, 1, 2, 3] * 2 + [4, 5, 6, 7] * 2))
    high = builder.and_(builder.lshr(high_src, _consts(_I8, [2] * 16)), _consts(_I8, ([0] * 4 + [0x30] * 4) * 2))
    return builder.or_(low, high)


def _block_q4_k(builder, ptrs, b, acc, macc):
    """8 groups of 32: group 2c + k is nibble k of qs[c*32 .. c*32 + 31], with 6-bit scale
    and min packed in the 12 bytes at 4 (_scales_mins_k4). The min term sum_g m_g * asum_g
    is one vector multiply and a lane sum (integers: any order gives the same sum)."""
    w, a, ad, asum = ptrs
    p = builder.mul(b, ir.Constant(b.type, 144))
    o = builder.mul(b, ir.Constant(b.type, QK_K))
    isum = ir.Constant(_vec(_I32, 8), [0] * 8)
    sm = _scales_mins_k4(builder, w, p)
    scales = builder.zext(builder.shuffle_vector(sm, sm, _consts(_I32, range(8))), _vec(_I16, 8))
    for g in range(8):
        packed = _load(builder, w, _idx(builder, p, 16 + (g >> 1) * 32), _vec(_I8, 32))
        q = _nibbles(builder, packed, 4 * (g & 1), 15)
        x = _load(builder, a, _idx(builder, o, g * 32), _vec(_I8, 32))
        sc16 = builder.shuffle_vector(scales, scales, _consts(_I32, [g] * 16))
        isum = builder.add(isum, _maddwd(builder, _maddubs(builder, q, x), sc16))
    mins = builder.zext(builder.shuffle_vector(sm, sm, _consts(_I32, range(8, 16))), _vec(_I32, 8))
    gsums = _load(builder, asum, builder.mul(b, ir.Constant(b.type, 32)), _vec(_I32, 8))   # asum[8b .. 8b+7]
    prod = builder.mul(mins, gsums)
    for n in (4, 2, 1):   # lane sum, halving
        prod = builder.add(builder.shuffle_vector(prod, prod, _consts(_I32, range(n))),
                           builder.shuffle_vector(prod, prod, _consts(_I32, range(n, 2 * n))))
    msum = builder.extract_element(prod, ir.Constant(_I32, 0))
    da = builder.load(builder.gep(ad, [b]))
    _add_lanes(builder, acc, isum, builder.fmul(_half8(builder, w, p), _splat(builder, da)))
    mterm = builder.fmul(builder.fmul(_half(builder, w, _idx(builder, p, 2)), da), builder.sitofp(msum, _F32))
    builder.store(builder.fadd(builder.load(macc), mterm), macc)


def _block_q6_k(builder, ptrs, b, acc, macc):
    """16 sub-blocks of 16 with int8 scales at 192; element e = n*128 + s*32 + t: low 4 bits
    nibble s//2 of ql[n*64 + (s%2)*32 + t], high 2 bits bits 2s.. of qh[128 + n*32 + t]; q - 32.
    Per 32 elements: q . x - 32 . x in int16 pairs, then vpmaddwd with the two sub-blocks'
    scales (lanes 0-3 the first 16 elements, 4-7 the second), shuffled out of the 16 scales
    widened once per super-block (two scalar loads and broadcasts per 32 elements before)."""
    w, a, ad, _ = ptrs
    p = builder.mul(b, ir.Constant(b.type, 210))
    o = builder.mul(b, ir.Constant(b.type, QK_K))
    isum = ir.Constant(_vec(_I32, 8), [0] * 8)
    c32 = _consts(_I8, [32] * 32)
    scales = builder.sext(_load(builder, w, _idx(builder, p, 192), _vec(_I8, 16)), _vec(_I16, 16))
    for e in range(0, QK_K, 32):
        n, s = e >> 7, (e >> 5) & 3
        lo = _nibbles(builder, _load(builder, w, _idx(builder, p, n * 64 + (s & 1) * 32), _vec(_I8, 32)),
                      4 * (s >> 1), 15)
        hi = _load(builder, w, _idx(builder, p, 128 + n * 32), _vec(_I8, 32))
        # bits 2s, 2s+1 of each qh byte moved to bits 4, 5 by one shift and a mask
        hi = builder.shl(hi, _consts(_I8, [4 - 2 * s] * 32)) if 2 * s < 4 else builder.lshr(hi, _consts(_I8, [2 * s - 4] * 32))
        q = builder.or_(lo, builder.and_(hi, _consts(_I8, [0x30] * 32)))
        x = _load(builder, a, _idx(builder, o, e), _vec(_I8, 32))
        pairs = builder.sub(_maddubs(builder, q, x), _maddubs(builder, c32, x))
        scv = builder.shuffle_vector(scales, scales, _consts(_I32, [e >> 4] * 8 + [(e >> 4) + 1] * 8))
        isum = builder.add(isum, _maddwd(builder, pairs, scv))
    scale = builder.fmul(_half8(builder, w, _idx(builder, p, 208)), _splat(builder, builder.load(builder.gep(ad, [b]))))
    _add_lanes(builder, acc, isum, scale)


_BLOCKS = (_block_32(34, _lanes_q8_0), _block_32(18, _lanes_offset(_q4_0_quants, 8)), _block_q4_k, _block_q6_k,
           _block_32(22, _lanes_offset(_q5_0_quants, 16)))   # by code
_rows_q8_0, _rows_q4_0, _rows_q4_k, _rows_q6_k, _rows_q5_0 = (
    _rows_intrinsic(block, size) for block, size in zip(_BLOCKS, QDOT_TYPE_SIZE))


@njit(cache=True)
def _quantize_row_q8(xq, xd, xs, x, QA):
    """xq (C,) int8, xd (C/QA,) scales, xs (C/32,) int32 group sums <- x (C,) float32:
    d = max|x| / 127 per QA elements, q = round-half-away(x * (1/d)), all in float32."""
    for b in range(x.shape[0] // QA):
        o = b * QA
        d, inv = _q8_scale(x, o, QA)
        xd[b] = d
        for j in range(QA):
            xq[o + j] = np.int8(_round_half_away(x[o + j] * inv))
    for g in range(x.shape[0] // QK):
        s = 0
        for j in range(QK):
            s += np.int64(xq[g * QK + j])
        xs[g] = s


@njit(parallel=True, cache=True)
def quantize_rows_q8(xq, xd, xs, x, QA):
    """Each row of x (N, C) float32 as int8 blocks of QA (32 or 256) elements: xq (N, C)
    int8, xd (N, C/QA) float32 scales, xs (N, C/32) int32 sums of each 32 int8s."""
    for n in prange(x.shape[0]):
        _quantize_row_q8(xq[n], xd[n], xs[n], x[n], QA)


@njit(cache=True, inline="always")
def qdot(code, w, rows, a, ad, asum):
    """Rows `rows` (a tuple of indices) of the weight matrix w (OC, bytes; raw blocks of type
    `code`, see QDOT_CODES) . one quantised activation row (a int8, ad scales, asum group sums
    from quantize_rows_q8): a tuple of float32s, one per row."""
    if code == 0:
        return _rows_q8_0(w, rows, a, ad, asum, a.shape[0] // QK)
    if code == 1:
        return _rows_q4_0(w, rows, a, ad, asum, a.shape[0] // QK)
    if code == 2:
        return _rows_q4_k(w, rows, a, ad, asum, a.shape[0] // QK_K)
    if code == 3:
        return _rows_q6_k(w, rows, a, ad, asum, a.shape[0] // QK_K)
    return _rows_q5_0(w, rows, a, ad, asum, a.shape[0] // QK)


QDOT_ROWS = 4   # weight rows per qdot call in the matmuls (measured: 4 > 2 > 1 on AVX2)


@njit(parallel=True, cache=True)
def matmul_qdot(out, xq, xd, xs, w, code):
    """out (N, OC) = x @ W^T on integers: W as rows w (OC, bytes) of block type `code`, x
    quantised by quantize_rows_q8 (xq (N, C) int8, xd, xs) with blocks of QDOT_BLOCK[code].
    Parallel over groups of QDOT_ROWS output rows (the last group takes what is left, one
    row at a time); each weight row is read once for all N activation rows."""
    OC, R = w.shape[0], QDOT_ROWS
    for g in prange((OC + R - 1) // R):
        r = g * R
        for n in range(xq.shape[0]):
            if r + R <= OC:
                out[n, r], out[n, r + 1], out[n, r + 2], out[n, r + 3] = qdot(
                    code, w, (r, r + 1, r + 2, r + 3), xq[n], xd[n], xs[n])
            else:
                for k in range(r, OC):
                    out[n, k] = qdot(code, w, (k,), xq[n], xd[n], xs[n])[0]


# ---------------------------------------------------------------------- vector dequantisers
# Prefill expands each quantised matrix into float32 for one sgemm (ops.linear_q), so the
# expansion is on the prompt's critical path. Scalar Numba loops over each block's bytes
# ran 1-4 ns per element; these intrinsics widen 32 quants at a time (the unpacking of the
# dot kernels above), multiply by the scales in the same float32 order as the scalar
# dequantisers (so the same bits as ggml's), and store 32 floats.

def _store32(builder, out, o, v):
    p = builder.gep(builder.bitcast(out, _F32.as_pointer()), [o])
    builder.store(v, builder.bitcast(p, v.type.as_pointer()), align=4)


def _f32x32(builder, q, signed=True):
    return (builder.sitofp if signed else builder.uitofp)(q, _vec(_F32, 32))


def _deq_32(nbytes, unpack):
    def block(builder, out, w, b):
        p = builder.mul(b, ir.Constant(b.type, nbytes))
        d = _splat(builder, _half(builder, w, p), 32)
        _store32(builder, out, builder.mul(b, ir.Constant(b.type, QK)),
                 builder.fmul(_f32x32(builder, unpack(builder, w, _idx(builder, p, 2))), d))
    return block


def _q8_0_quants(builder, w, at):
    return _load(builder, w, at, _vec(_I8, 32))


def _offset_quants(quants, offset):
    """The signed quants q - offset of an unsigned 32-element format (Q4_0, Q5_0)."""
    return lambda builder, w, at: builder.sub(quants(builder, w, at), _consts(_I8, [offset] * 32))


def _deq_q4_k(builder, out, w, b):
    """dl * q - ml per group of 32 (dl = d*sc, ml = dmin*m), as dequantize_q4_k."""
    p = builder.mul(b, ir.Constant(b.type, 144))
    o = builder.mul(b, ir.Constant(b.type, QK_K))
    d, dmin = _half(builder, w, p), _half(builder, w, _idx(builder, p, 2))
    sb = [_byte(builder, w, _idx(builder, p, 4 + i)) for i in range(12)]
    for g in range(8):
        sc, m = _scale_min_k4_ir(builder, sb, g)
        dl = _splat(builder, builder.fmul(d, builder.sitofp(sc, _F32)), 32)
        ml = _splat(builder, builder.fmul(dmin, builder.sitofp(m, _F32)), 32)
        q = _nibbles(builder, _load(builder, w, _idx(builder, p, 16 + (g >> 1) * 32), _vec(_I8, 32)), 4 * (g & 1), 15)
        _store32(builder, out, _idx(builder, o, g * 32),
                 builder.fsub(builder.fmul(dl, _f32x32(builder, q, False)), ml))


def _deq_q6_k(builder, out, w, b):
    """(d * sc) * (q - 32) per sub-block of 16, as dequantize_q6_k."""
    p = builder.mul(b, ir.Constant(b.type, 210))
    o = builder.mul(b, ir.Constant(b.type, QK_K))
    d = _half(builder, w, _idx(builder, p, 208))
    for e in range(0, QK_K, 32):
        n, s = e >> 7, (e >> 5) & 3
        lo = _nibbles(builder, _load(builder, w, _idx(builder, p, n * 64 + (s & 1) * 32), _vec(_I8, 32)),
                      4 * (s >> 1), 15)
        hi = _nibbles(builder, _load(builder, w, _idx(builder, p, 128 + n * 32), _vec(_I8, 32)), 2 * s, 3)
        q = builder.sub(builder.or_(lo, builder.shl(hi, _consts(_I8, [4] * 32))), _consts(_I8, [32] * 32))
        sc = [builder.fmul(d, builder.sitofp(_load(builder, w, _idx(builder, p, 192 + (e >> 4) + h), _I8), _F32))
              for h in range(2)]
        scale = builder.shuffle_vector(_splat(builder, sc[0], 32), _splat(builder, sc[1], 32),
                                       _consts(_I32, [0] * 16 + [32] * 16))
        _store32(builder, out, _idx(builder, o, e), builder.fmul(scale, _f32x32(builder, q)))


def _deq_intrinsic(block):
    """An intrinsic f(out, raw, b0, b1): blocks b0 .. b1-1 of raw, expanded into out."""
    @intrinsic
    def deq(typingctx, out, raw, b0, b1):
        def codegen(context, builder, sig, args):
            o, w = (context.make_array(t)(context, builder, v).data for t, v in zip(sig.args[:2], args[:2]))
            lo, hi = (context.cast(builder, v, t, numba.types.intp) for v, t in zip(args[2:], sig.args[2:]))
            with cgutils.for_range_slice(builder, lo, hi, ir.Constant(lo.type, 1)) as (b, _):
                block(builder, o, w, b)
            return context.get_dummy_value()
        return numba.types.none(out, raw, b0, b1), codegen
    return deq


_deq_q8_0, _deq_q4_0 = _deq_intrinsic(_deq_32(34, _q8_0_quants)), _deq_intrinsic(_deq_32(18, _offset_quants(_q4_0_quants, 8)))
_deq_q5_0 = _deq_intrinsic(_deq_32(22, _offset_quants(_q5_0_quants, 16)))
_deq_q4_k_blocks, _deq_q6_k_blocks = _deq_intrinsic(_deq_q4_k), _deq_intrinsic(_deq_q6_k)


@njit(parallel=True, cache=True)
def dequantize_blocks(out, raw, code):
    """out (n,) float32 <- raw blocks of type `code` (QDOT_CODES), chunks of blocks split
    across threads. Same bits as the scalar dequantisers."""
    nb = out.shape[0] // QDOT_BLOCK[code]
    chunk = 64
    for c in prange((nb + chunk - 1) // chunk):
        b0, b1 = c * chunk, min(c * chunk + chunk, nb)
        if code == 0:
            _deq_q8_0(out, raw, b0, b1)
        elif code == 1:
            _deq_q4_0(out, raw, b0, b1)
        elif code == 2:
            _deq_q4_k_blocks(out, raw, b0, b1)
        elif code == 3:
            _deq_q6_k_blocks(out, raw, b0, b1)
        else:
            _deq_q5_0(out, raw, b0, b1)


@njit(cache=True)
def dequantize_q8_0(out, raw, f16):
    """out (n,) float32 <- Q8_0 blocks raw: d * q (f16 unused: the scales widen in vector IR)."""
    dequantize_blocks(out, raw, 0)


@njit(cache=True)
def dequantize_q4_0(out, raw, f16):
    """out (n,) float32 <- Q4_0 blocks raw: d * (q - 8)."""
    dequantize_blocks(out, raw, 1)


@njit(cache=True)
def dequantize_q4_k(out, raw, f16):
    """out (n,) float32 <- Q4_K super-blocks raw: 8 sub-blocks of 32; sub-block g = 2c + k is
    nibble k of qs[c*32 .. c*32 + 31]; (d*sc) * q - (dmin*m)."""
    dequantize_blocks(out, raw, 2)


@njit(cache=True)
def dequantize_q6_k(out, raw, f16):
    """out (n,) float32 <- Q6_K super-blocks raw: 16 sub-blocks of 16 with int8 scales.
    Element e = n*128 + r: low 4 bits are nibble r//64 of ql[n*64 + r%64], high 2 bits are
    bits 2*(r//32).. of qh[n*32 + r%32]; (d*sc) * (q - 32)."""
    dequantize_blocks(out, raw, 3)


@njit(cache=True)
def dequantize_q5_0(out, raw, f16):
    """out (n,) float32 <- Q5_0 blocks raw: d * (q - 16), q = nibble | (bit j of qh) << 4."""
    dequantize_blocks(out, raw, 4)
