"""BitNet b1.58: linear layers with ternary weights and 8-bit activations.

Training (quantisation-aware): `bitlinear(tape, x, W)` keeps W as latent float weights and
computes, as the BitNet b1.58 papers define it,

    s  = mean|W| (per tensor)       Wq = clip(round(W / s), -1, 1) * s
    a  = max|x| (per row / token)   xq = clip(round(x * 127 / a), -128, 127) * a / 127
    out = xq @ Wq^T

and its backward is the straight-through estimator: both quantisers count as the identity,
so dx += dout @ Wq and dW += dout^T @ xq (gradients reach the latent weights and inputs).

Inference: `pack(model)` turns a trained BitNet Llama into one whose projections are
ternary codes packed 2 bits per weight with one float16 scale per row ("T2" rows, see
nt.kernels.cpu.bitnet.pack_t2), and `linear_t2` multiplies them with int8 activation codes:
integer products summed over the row, then one multiply by the row's weight scale and one
by the activation row's scale. The model's `generate` uses it for prefill and decoding.
GGUF files carry the same weights as llama.cpp's TQ2_0 or TQ1_0 (`to_gguf_rows` / `from_gguf_rows`).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import backend
from .io.gguf import dequantize, quantize
from .ops import _check, _grad
from .tape import Tape
from .tensor import Tensor

__all__ = ["bitlinear", "linear_t2", "to_gguf_rows", "from_gguf_rows", "quantized_weight", "weight_quant", "act_quant", "pack_ternary", "ternary_codes", "pack",
           "unpack_weights", "BITLINEAR", "QK", "GGUF_TYPES"]

# the projections of a Llama block that bitnet=True makes BitLinear (embeddings, norms and
# the classifier stay full precision)
BITLINEAR = ("qkvw", "attn_out", "gate_up", "down")
QK = 256          # weights per TQ2_0 / TQ1_0 block (GGUF)
GGUF_TYPES = {"TQ2_0": 66, "TQ1_0": 54}   # llama.cpp's ternary types: bytes per block
# from this many rows on (a prompt's prefill) linear_t2 expands the codes for one BLAS call
DEQUANT_ROWS = 16


def bitlinear(t: Tape, x: Tensor, weight: Tensor) -> Tensor:
    """out = actquant(x) @ weightquant(weight)^T over the last axis of x; weight (OC, C)
    holds the latent float weights. See the module docstring for the quantisers and the
    straight-through backward."""
    _check(x, "x", None, t)
    _check(weight, "weight", 2, t)
    OC, C = weight.shape
    if x.shape[-1] != C:
        raise ValueError(f"bitlinear: x has {x.shape[-1]} features, weight {weight.shape} expects {C}")
    N = x.size // C
    out = t.new(x.shape[:-1] + (OC,))
    xq = t.new_saved((N, C))      # quantised activations, dequantised (the backward's dW input)
    xs = t.new_saved((N,))        # per-row activation scale a / 127
    wq = t.new_saved((OC, C))     # ternary weights times s (the backward's dx input)
    scale = t.new_saved((1,))     # s
    t.k.bitlinear_forward(out.data.reshape(N, OC), xq.data, xs.data, wq.data, scale.data,
                          x.data.reshape(N, C), weight.data)
    t.record(_bitlinear_backward, out, x, weight, xq, wq)
    return out


def _bitlinear_backward(k, out, x, weight, xq, wq):
    C, OC = x.shape[-1], out.shape[-1]
    N = x.size // C
    k.bitlinear_backward(x.grad.reshape(N, C), _grad(k, weight), out.grad.reshape(N, OC), xq.data, wq.data)


def linear_t2(t: Tape, x: Tensor, w: np.ndarray) -> Tensor:
    """out = x @ W^T for W (OC, C) stored as T2 rows `w` (OC, C/4 + 2) uint8 (pack_ternary),
    with x quantised per row to int8 codes (the BitLinear activation rule). Fewer than
    DEQUANT_ROWS rows (decoding): integer products on the packed codes (matmul_t2). More
    (prefill): the codes are expanded into the tape's scratch (OC x C float32, reused) and
    multiplied with the dequantised activation codes in one BLAS call, as ops.linear_q does
    (the same products, summed in float32: BLAS is ~10x the integer kernel at many rows).
    Inference only, CPU, float32: a backward through it raises RuntimeError."""
    _check(x, "x", None, t)
    if not hasattr(t.k, "matmul_t2"):
        raise NotImplementedError(f"linear_t2: the {t.k.DEVICE} backend has no ternary matmul (CPU only)")
    if t.dtype != np.float32:
        raise TypeError(f"linear_t2 computes in float32, the tape is {t.dtype}")
    C = x.shape[-1]
    if C % 4:
        raise ValueError(f"linear_t2: x has {C} features, not a multiple of 4 (four 2-bit codes per byte)")
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != C // 4 + 2 \
            or not w.flags.c_contiguous:
        raise ValueError(f"linear_t2: w must be C-contiguous uint8 (OC, {C // 4 + 2}) T2 rows for C={C}, "
                         f"got {getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    OC, N = w.shape[0], x.size // C
    out = t.new(x.shape[:-1] + (OC,))
    t.record(_linear_t2_backward)
    if N >= DEQUANT_ROWS:
        wf = t.work((OC, C))
        t.k.unpack_t2(wf, w, t.k.F16_TABLE)
        xq, xs = t.new_saved((N, C)), t.new_saved((N,))
        t.k.act_quant(xq.data, xs.data, x.data.reshape(N, C))
        t.k.matmul_forward(out.data.reshape(N, OC), xq.data, wf, wf.reshape(-1)[:0])   # no bias
        return out
    q = t.ints.alloc((N, C // 4)).data.view(np.int8)   # int8 codes, four to an int32 of the arena
    qsum = t.ints.alloc((N,))
    xs = t.new_saved((N,))
    t.k.act_quant_int8(q, xs.data, qsum.data, x.data.reshape(N, C))
    t.k.matmul_t2(out.data.reshape(N, OC), q, xs.data, qsum.data, w)
    return out


def _linear_t2_backward(k):
    raise RuntimeError("linear_t2 (packed ternary weights) is forward-only: a packed BitNet model runs "
                       "inference; train the unpacked model (its latent weights) instead")


# ---------------------------------------------------------------------- quantisers on host arrays

def quantized_weight(w: np.ndarray) -> tuple[np.ndarray, float]:
    """(codes * s as float32, s) of a float weight tensor by the absmean rule: what the
    training forward multiplies by (the same kernel)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    wq, scale = np.empty(w.size, np.float32), np.empty(1, np.float32)
    backend("cpu").weight_quant(wq, scale, w.reshape(-1))
    return wq.reshape(w.shape), float(scale[0])


def weight_quant(w: np.ndarray) -> tuple[np.ndarray, float]:
    """(int8 ternary codes, s) of a float weight tensor by the absmean rule."""
    wq, s = quantized_weight(w)
    return ternary_codes(wq, s), s


def act_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes (N, C), scales (N,)) of float rows x (N, C) by the absmax rule: x ~ codes * scales[:, None]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"act_quant: x must be (N, C), got {x.shape}")
    q, xs, qsum = np.empty(x.shape, np.int8), np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.int32)
    backend("cpu").act_quant_int8(q, xs, qsum, x)
    return q, xs


def ternary_codes(wq: np.ndarray, scale: float) -> np.ndarray:
    """The int8 codes of dequantised ternary weights wq = codes * scale."""
    return np.rint(np.asarray(wq, dtype=np.float64) / scale).astype(np.int8)


def pack_ternary(codes: np.ndarray, scale) -> np.ndarray:
    """T2 rows (OC, C/4 + 2) uint8 of ternary `codes` (OC, C) in {-1, 0, 1}, each row with
    its scale (one number, or one per row; stored as float16). Raises ValueError for codes
    outside {-1, 0, 1}, C not a multiple of 4, or a scale that is not finite, positive and
    within float16's range."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 4:
        raise ValueError(f"pack_ternary: codes must be (OC, C) with C a multiple of 4 (four 2-bit codes per byte), "
                         f"got shape {codes.shape}")
    if codes.dtype.kind not in "iu" or (codes.size and (codes.min() < -1 or codes.max() > 1)):
        bad = codes[(codes < -1) | (codes > 1)] if codes.dtype.kind in "iu" else codes.dtype
        raise ValueError(f"pack_ternary: codes must be integers in {{-1, 0, 1}}, got {np.ravel(bad)[:4]} ...")
    OC, C = codes.shape
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (OC,))
    if not np.all(np.isfinite(scale) & (scale > 0) & (scale < 65504)):
        raise ValueError(f"pack_ternary: scales must be finite, positive and below float16's max, got {scale[:4]} ...")
    raw = np.empty((OC, C // 4 + 2), dtype=np.uint8)
    backend("cpu").pack_t2(raw, np.ascontiguousarray(codes, dtype=np.int8), scale.astype(np.float16).view(np.uint16))
    return raw


def unpack_weights(w: np.ndarray) -> np.ndarray:
    """Float32 (OC, C) values scale * code of T2 rows w (OC, C/4 + 2)."""
    k = backend("cpu")
    out = np.empty((w.shape[0], (w.shape[1] - 2) * 4), dtype=np.float32)
    k.unpack_t2(out, np.ascontiguousarray(w, dtype=np.uint8), k.F16_TABLE)
    return out


def to_gguf_rows(w: np.ndarray, type: str = "TQ2_0") -> np.ndarray:
    """T2 rows as llama.cpp's TQ2_0 (OC, C/256 * 66) or TQ1_0 (OC, C/256 * 54) rows: the same
    codes, the row scale in every block."""
    if type not in GGUF_TYPES:
        raise ValueError(f"ternary GGUF types are {GGUF_TYPES}, got {type!r}")
    return quantize(unpack_weights(w), type)


def from_gguf_rows(rows: np.ndarray, type: str = "TQ2_0") -> np.ndarray:
    """TQ2_0 or TQ1_0 rows (OC, bytes) as T2 rows. nt runs one scale per row: every block of
    a row that is not all zeros must have the same scale (ValueError otherwise), as in files
    nt writes and BitNet models with a per-tensor scale."""
    values = dequantize(rows, type, (rows.shape[0], rows.shape[1] // GGUF_TYPES[type] * QK))
    scale = np.abs(values).max(axis=1)   # d of the row's non-zero blocks (values are 0 or +-d)
    codes = np.divide(values, scale[:, None], out=np.zeros_like(values), where=scale[:, None] > 0)
    if not np.array_equal(codes, np.rint(codes)):
        raise ValueError("TQ2_0 rows whose blocks have different scales: nt's ternary matmul uses one scale per row")
    return pack_ternary(codes.astype(np.int8), np.where(scale > 0, scale, 1.0))


def pack(model):
    """An inference copy of a BitNet Llama (config.bitnet) with its BitLinear projections
    packed as T2 rows (model.qweights; they leave the float parameters), run by linear_t2.
    Other parameters (embedding, norms, classifier) are copied as float32. The projections'
    fused rows (q|k|v, gate|up) share one scale, as in training."""
    from .models.llama import Llama
    cfg = model.config
    if not getattr(cfg, "bitnet", False):
        raise ValueError("pack() needs a BitNet model (LlamaConfig(bitnet=True))")
    if model.quantized:
        raise ValueError(f"the model is already packed/quantised ({sorted(model.quantized)})")
    packed = Llama(cfg, device="cpu", dtype=np.float32, seed=None, quantized={n: "T2" for n in BITLINEAR})
    for name, t in packed.params.items():
        t.data[...] = model.params[name].numpy()
    for name in BITLINEAR:
        for l in range(cfg.n_layers):
            codes, s = weight_quant(model.params[name][l].numpy())
            packed.qweights[name][l] = pack_ternary(codes, s)
    packed.tokenizer = model.tokenizer
    return packed
