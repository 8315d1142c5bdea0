"""BitNet b1.58: linear layers with ternary weights and 8-bit activations.

Training (quantisation-aware): `bitlinear(tape, x, W)` keeps W as latent float weights and
computes, as the BitNet b1.58 papers define it,

    s  = mean|W| (per tensor)       Wq = clip(round(W / s), -1, 1) * s
    a  = max|x| (per row / token)   xq = clip(round(x * 127 / a), -128, 127) * a / 127
    out = xq @ Wq^T

and its backward is the straight-through estimator: both quantisers count as the identity,
so dx += dout @ Wq and dW += dout^T @ xq (gradients reach the latent weights and inputs).

Inference: `pack(model)` turns a trained BitNet Llama into one whose projections are
ternary codes in llama.cpp's TQ2_0 layout (2 bits per weight + one float16 scale per 256:
2.06 bits per weight) and `linear_tq2_0` multiplies them with int8 activations: integer
products summed per 256-weight block, one multiply by the block scale, one by the row's
activation scale. The model's `generate` uses it for prefill and decoding alike.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import backend
from .io.gguf import dequantize
from .ops import _check, _grad
from .tape import Tape
from .tensor import Tensor

__all__ = ["bitlinear", "linear_tq2_0", "quantized_weight", "weight_quant", "act_quant", "pack_ternary", "ternary_codes", "pack",
           "unpack_weights", "BITLINEAR", "QK", "TQ2_BYTES"]

# the projections of a Llama block that bitnet=True makes BitLinear (embeddings, norms and
# the classifier stay full precision)
BITLINEAR = ("qkvw", "attn_out", "gate_up", "down")
QK = 256          # weights per TQ2_0 block
TQ2_BYTES = 66    # bytes per TQ2_0 block


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


def linear_tq2_0(t: Tape, x: Tensor, w: np.ndarray) -> Tensor:
    """out = x @ W^T for W (OC, C) stored as TQ2_0 rows `w` (OC, C/256*66) uint8, with x
    quantised per row to int8 (the BitLinear activation rule) and integer products.
    Inference only, CPU, float32: a backward through it raises RuntimeError."""
    _check(x, "x", None, t)
    if not hasattr(t.k, "matmul_tq2_0"):
        raise NotImplementedError(f"linear_tq2_0: the {t.k.DEVICE} backend has no ternary matmul (CPU only)")
    if t.dtype != np.float32:
        raise TypeError(f"linear_tq2_0 computes in float32, the tape is {t.dtype}")
    C = x.shape[-1]
    if C % QK:
        raise ValueError(f"linear_tq2_0: x has {C} features, not a multiple of the TQ2_0 block size {QK}")
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != C // QK * TQ2_BYTES \
            or not w.flags.c_contiguous:
        raise ValueError(f"linear_tq2_0: w must be C-contiguous uint8 (OC, {C // QK * TQ2_BYTES}) TQ2_0 rows for "
                         f"C={C}, got {getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    OC, N = w.shape[0], x.size // C
    out = t.new(x.shape[:-1] + (OC,))
    q = t.ints.alloc((N, C))             # int8 codes (held in int32 memory)
    qsum = t.ints.alloc((N, C // QK))    # their sum per block
    xs = t.new_saved((N,))
    t.k.act_quant_int8(q.data, xs.data, qsum.data, x.data.reshape(N, C))
    t.k.matmul_tq2_0(out.data.reshape(N, OC), q.data, xs.data, qsum.data, w, t.k.F16_TABLE)
    t.record(_linear_tq2_0_backward)
    return out


def _linear_tq2_0_backward(k):
    raise RuntimeError("linear_tq2_0 (packed ternary weights) is forward-only: a packed BitNet model runs "
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
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"act_quant: x must be (N, C) with C a multiple of {QK}, got {x.shape}")
    q, xs = np.empty(x.shape, np.int32), np.empty(x.shape[0], np.float32)
    qsum = np.empty((x.shape[0], x.shape[1] // QK), np.int32)
    backend("cpu").act_quant_int8(q, xs, qsum, x)
    return q.astype(np.int8), xs


def ternary_codes(wq: np.ndarray, scale: float) -> np.ndarray:
    """The int8 codes of dequantised ternary weights wq = codes * scale."""
    return np.rint(np.asarray(wq, dtype=np.float64) / scale).astype(np.int8)


def pack_ternary(codes: np.ndarray, scale: float) -> np.ndarray:
    """TQ2_0 rows (OC, C/256*66) uint8 of ternary `codes` (OC, C) in {-1, 0, 1} with one
    scale (stored as float16 in every block). Raises ValueError for codes outside {-1, 0, 1},
    rows not a multiple of 256 long, or a non-finite / non-positive scale."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % QK:
        raise ValueError(f"pack_ternary: codes must be (OC, C) with C a multiple of the TQ2_0 block size {QK}, "
                         f"got shape {codes.shape}")
    if codes.dtype.kind not in "iu" or (codes.size and (codes.min() < -1 or codes.max() > 1)):
        bad = codes[(codes < -1) | (codes > 1)] if codes.dtype.kind in "iu" else codes.dtype
        raise ValueError(f"pack_ternary: codes must be integers in {{-1, 0, 1}}, got {np.ravel(bad)[:4]} ...")
    if not (math.isfinite(scale) and 0 < scale < 65504):
        raise ValueError(f"pack_ternary: scale must be finite, positive and below float16's max, got {scale}")
    OC, C = codes.shape
    raw = np.empty(OC * C // QK * TQ2_BYTES, dtype=np.uint8)
    d16 = np.full(OC * C // QK, np.float16(scale).view(np.uint16), dtype=np.uint16)
    backend("cpu").pack_tq2_0(raw, np.ascontiguousarray(codes, dtype=np.int8).reshape(-1), d16)
    return raw.reshape(OC, C // QK * TQ2_BYTES)


def pack(model):
    """An inference copy of a BitNet Llama (config.bitnet) with its BitLinear projections
    packed as TQ2_0 rows (model.qweights; they leave the float parameters), run by
    linear_tq2_0. Other parameters (embedding, norms, classifier) are copied as float32.
    The projections' fused rows (q|k|v, gate|up) share one scale, as in training."""
    from .models.llama import Llama
    cfg = model.config
    if not getattr(cfg, "bitnet", False):
        raise ValueError("pack() needs a BitNet model (LlamaConfig(bitnet=True))")
    if model.quantized:
        raise ValueError(f"the model is already packed/quantised ({sorted(model.quantized)})")
    packed = Llama(cfg, device="cpu", dtype=np.float32, seed=None, quantized={n: "TQ2_0" for n in BITLINEAR})
    for name, t in packed.params.items():
        t.data[...] = model.params[name].numpy()
    for name in BITLINEAR:
        for l in range(cfg.n_layers):
            codes, s = weight_quant(model.params[name][l].numpy())
            packed.qweights[name][l] = pack_ternary(codes, s)
    packed.tokenizer = model.tokenizer
    return packed


def unpack_weights(w: np.ndarray) -> np.ndarray:
    """Float32 (OC, C) values d * code of TQ2_0 rows w (OC, C/256*66)."""
    return dequantize(w, "TQ2_0", (w.shape[0], w.shape[1] // TQ2_BYTES * QK))
