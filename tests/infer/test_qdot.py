"""Integer dot-product kernels (kernels/cpu/quant.py: quantize_rows_q8, matmul_qdot) against a
NumPy reference of the same integer arithmetic (bit-exact), and against the float
dequantise-then-matmul (within the activation quantisation error)."""
import numpy as np
import pytest

from nt.io import gguf
from nt.kernels.cpu import quant

TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_0")


def random_blocks(kind: str, OC: int, C: int, rng, scale=(1e-3, 2e-2)) -> np.ndarray:
    """(OC, bytes) rows of `kind` with random quants and f16 scales uniform in `scale`."""
    code = quant.QDOT_CODES[kind]
    bs, ts = quant.QDOT_BLOCK[code], quant.QDOT_TYPE_SIZE[code]
    raw = rng.integers(0, 256, (OC * C // bs, ts), dtype=np.uint8)
    scales = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q6_K": [208], "Q5_0": [0]}[kind]
    for at in scales:
        raw[:, at:at + 2] = rng.uniform(*scale, (raw.shape[0], 1)).astype("<f2").view(np.uint8)
    return raw.reshape(OC, -1)


def ref_quantize(x: np.ndarray, QA: int):
    """quantize_rows_q8 in NumPy float32: d = amax/127, q = round-half-away(x * (1/d))."""
    N, C = x.shape
    xb = x.reshape(N, C // QA, QA)
    d = np.abs(xb).max(axis=2) / np.float32(127.0)
    inv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = xb * inv[..., None]
    a = np.abs(v)
    r = np.floor(a) + np.floor(np.float32(2.0) * (a - np.floor(a)))
    q = np.where(v < 0, -r, r).astype(np.int8).reshape(N, C)
    return q, d.astype(np.float32), q.reshape(N, C // 32, 32).astype(np.int64).sum(axis=2)


def _f16(raw, at):
    return raw[:, at:at + 2].copy().view("<f2").astype(np.float32)[:, 0]


def ref_weight_ints(kind: str, w: np.ndarray, C: int):
    """The integer quants (OC, C) and per-block float/integer scales of rows w."""
    OC = w.shape[0]
    code = quant.QDOT_CODES[kind]
    blocks = w.reshape(OC * C // quant.QDOT_BLOCK[code], -1)
    if kind == "Q8_0":
        return blocks[:, 2:].view(np.int8).astype(np.int64).reshape(OC, C), _f16(blocks, 0)
    if kind == "Q4_0":
        qs = blocks[:, 2:].astype(np.int64)
        return np.concatenate([qs & 15, qs >> 4], axis=1).reshape(OC, C) - 8, _f16(blocks, 0)
    if kind == "Q5_0":   # element j: nibble j (as Q4_0) | bit j of the little-endian u32 qh << 4
        qs = blocks[:, 6:].astype(np.int64)
        qh = blocks[:, 2:6].copy().view("<u4").astype(np.int64)
        high = ((qh >> np.arange(32)) & 1) << 4
        return (np.concatenate([qs & 15, qs >> 4], axis=1) | high).reshape(OC, C) - 16, _f16(blocks, 0)
    if kind == "Q4_K":
        qs = blocks[:, 16:].astype(np.int64).reshape(-1, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(OC, C)   # group 2c + k = nibble k of qs[c]
        sc = blocks[:, 4:16].astype(np.int64)
        scale = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 15) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
        mins = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
        return q, (_f16(blocks, 0), _f16(blocks, 2), scale, mins)
    ql, qh = blocks[:, :128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    q = np.empty((blocks.shape[0], 256), np.int64)
    for e in range(256):
        n, r = e >> 7, e & 127
        lo = (ql[:, n * 64 + (r & 63)] >> (4 * (r >> 6))) & 15
        hi = (qh[:, n * 32 + (r & 31)] >> (2 * (r >> 5))) & 3
        q[:, e] = (lo | (hi << 4)) - 32
    return q.reshape(OC, C), (_f16(blocks, 208), blocks[:, 192:208].view(np.int8).astype(np.int64))


def _lanes(prod: np.ndarray) -> np.ndarray:
    """(..., n) integer products of a 32- or 16-element group -> (..., n/4) lane sums: lane j
    holds elements 4j .. 4j+3, as vpmaddubsw + vpmaddwd add them."""
    return prod.reshape(prod.shape[:-1] + (prod.shape[-1] // 4, 4)).sum(axis=-1)


def ref_matmul(kind: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (N, C) @ W^T with matmul_qdot's arithmetic: per block, 8 lanes of integer sums
    (times the sub-block scales for the K-quants), converted to float32 and times the block
    pair's scale, accumulated per lane over the blocks in order; then the lanes summed in
    order (Q4_K: minus the running sum of the min terms)."""
    N, C = x.shape
    OC = w.shape[0]
    code = quant.QDOT_CODES[kind]
    QA = quant.QDOT_BLOCK[code]
    a, ad, asum = ref_quantize(x, QA)
    q, scales = ref_weight_ints(kind, w, C)
    nb = C // QA
    sub = 16 if kind == "Q6_K" else 32
    prod = q.reshape(1, OC, C // sub, sub) * a.astype(np.int64).reshape(N, 1, C // sub, sub)
    lanes = _lanes(prod)                                   # (N, OC, C/sub, 8) exact integers
    acc = np.zeros((N, OC, 8), np.float32)
    macc = np.zeros((N, OC), np.float32)
    for b in range(nb):
        da = ad[:, b][:, None]
        if kind in ("Q8_0", "Q4_0", "Q5_0"):
            isum, scale = lanes[:, :, b], scales.reshape(OC, nb)[:, b][None, :] * da
        elif kind == "Q4_K":
            d, dmin, sc, mins = (s.reshape(OC, nb, *s.shape[1:])[:, b] for s in scales)
            isum = (lanes[:, :, b * 8:(b + 1) * 8] * sc[None, :, :, None]).sum(axis=2)
            msum = (mins[None] * asum[:, None, b * 8:(b + 1) * 8]).sum(axis=2)
            scale = d[None] * da
            macc = macc + (dmin[None] * da) * msum.astype(np.float32)
        else:   # 16 sub-blocks of 16 (4 lanes each), two to a group of 8 lanes
            d, sc = (s.reshape(OC, nb, *s.shape[1:])[:, b] for s in scales)
            scaled = lanes[:, :, b * 16:(b + 1) * 16] * sc[None, :, :, None]
            isum = scaled.reshape(N, OC, 8, 8).sum(axis=2)
            scale = d[None] * da
        acc = acc + isum.astype(np.float32) * scale[..., None]
    total = acc[..., 0]
    for j in range(1, 8):
        total = total + acc[..., j]
    return total - macc


def qdot_matmul(kind: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    N, C = x.shape
    code = quant.QDOT_CODES[kind]
    QA = quant.QDOT_BLOCK[code]
    xq, xd, xs = np.empty((N, C), np.int8), np.empty((N, C // QA), np.float32), np.empty((N, C // 32), np.int32)
    quant.quantize_rows_q8(xq, xd, xs, x, QA)
    out = np.empty((N, w.shape[0]), np.float32)
    quant.matmul_qdot(out, xq, xd, xs, w, code)
    return out


@pytest.mark.parametrize("QA", [32, 256])
def test_activation_quantiser_matches_numpy(QA):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 512)) * 3).astype(np.float32)
    x[1, :QA] = 0.0   # an all-zero block: scale 0, quants 0
    xq, xd, xs = np.empty((3, 512), np.int8), np.empty((3, 512 // QA), np.float32), np.empty((3, 16), np.int32)
    quant.quantize_rows_q8(xq, xd, xs, x, QA)
    q, d, s = ref_quantize(x, QA)
    assert np.array_equal(xq, q) and np.array_equal(xd, d) and np.array_equal(xs, s)
    assert np.abs(xq.astype(np.float32) * np.repeat(xd, QA, axis=1) - x).max() <= xd.max() / 2 * 1.001


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("N,OC", [(1, 1), (1, 4), (1, 7), (3, 5), (2, 9)])
def test_integer_matmul_is_bit_exact_to_numpy(kind, N, OC):
    rng = np.random.default_rng(N * 10 + OC)
    C = 512
    w = random_blocks(kind, OC, C, rng)
    x = rng.standard_normal((N, C)).astype(np.float32)
    got = qdot_matmul(kind, x, w)
    assert np.array_equal(got, ref_matmul(kind, x, w))
    # and the reference means what the format means: close to dequantise-then-matmul
    wf = gguf.dequantize(w.reshape(-1), kind, (OC, C))
    exact = x.astype(np.float64) @ wf.T.astype(np.float64)
    QA = quant.QDOT_BLOCK[quant.QDOT_CODES[kind]]
    a, ad, _ = ref_quantize(x, QA)
    x_err = np.abs(x - a.astype(np.float64) * np.repeat(ad, QA, axis=1))   # what quantising x lost
    bound = x_err @ np.abs(wf.T.astype(np.float64)) + 1e-5 * np.abs(x) @ np.abs(wf.T.astype(np.float64))
    assert np.all(np.abs(got - exact) <= bound)


def test_q8_0_and_q4_0_of_nt_quantiser_track_the_float_matmul():
    """Weights quantised by nt's writer: the integer kernels stay within the activation's
    quantisation error (about 1/254 of each block's max) of the float block kernel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    W = rng.standard_normal((9, 96)).astype(np.float32)
    for kind in ("Q8_0", "Q4_0"):
        wq = gguf.quantize(W, kind)
        float_kernel = gguf.quantized_matmul(x, wq, kind)
        got = qdot_matmul(kind, x, wq)
        assert np.abs(got - float_kernel).max() < 0.03 * np.abs(float_kernel).max()


@pytest.mark.parametrize("kind", TYPES)
def test_generic_ir_gives_the_avx2_bits(kind, monkeypatch):
    """The IR a non-AVX2 target gets (no vpmaddubsw / vpsignb by name) computes the same
    integers, so the same bits: compiled here, uncached, with the AVX2 switch off."""
    from numba import njit
    code = quant.QDOT_CODES[kind]
    monkeypatch.setattr(quant, "_AVX2", False)
    rows_dot = quant._rows_intrinsic(quant._BLOCKS[code], quant.QDOT_TYPE_SIZE[code])

    @njit
    def generic(w, a, ad, asum, nb):
        return rows_dot(w, (0, 1, 2), a, ad, asum, nb)

    rng = np.random.default_rng(7)
    C = 512
    w = random_blocks(kind, 3, C, rng)
    w[0, 2:34] = 128 if kind == "Q8_0" else w[0, 2:34]    # q = -128: |q| = 128 (vpsignb wraps)
    x = rng.standard_normal((1, C)).astype(np.float32)
    QA = quant.QDOT_BLOCK[code]
    xq, xd, xs = np.empty((1, C), np.int8), np.empty((1, C // QA), np.float32), np.empty((1, C // 32), np.int32)
    quant.quantize_rows_q8(xq, xd, xs, x, QA)
    got = np.array(generic(w, xq[0], xd[0], xs[0], C // QA), np.float32)
    assert np.array_equal(got, ref_matmul(kind, x, w)[0])
    assert np.array_equal(got, qdot_matmul(kind, x, w)[0])


@pytest.mark.parametrize("C", [224, 576])   # 7 blocks; SmolLM2-135M's dim (18 blocks)
@pytest.mark.parametrize("OC", [1, 4, 6])
def test_q5_0_odd_widths_are_bit_exact_and_dequantise_like_numpy(C, OC):
    """Q5_0 (llama.cpp's stand-in for Q4_K when rows are no multiple of 256): the integer
    dots at 1 and 4 rows per pass, and the vector dequantiser (d * (q - 16) in float32)."""
    rng = np.random.default_rng(C + OC)
    w = random_blocks("Q5_0", OC, C, rng)
    x = rng.standard_normal((2, C)).astype(np.float32)
    assert np.array_equal(qdot_matmul("Q5_0", x, w), ref_matmul("Q5_0", x, w))
    q, d = ref_weight_ints("Q5_0", w, C)
    want = (np.repeat(d.reshape(OC, -1), 32, axis=1) * q.astype(np.float32)).astype(np.float32)
    got = np.empty(OC * C, np.float32)
    quant.dequantize_q5_0(got, w.reshape(-1), quant.F16_TABLE)
    assert np.array_equal(got.reshape(OC, C), want)
