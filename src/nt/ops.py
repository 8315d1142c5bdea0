"""Ops: check inputs, take outputs from the tape, run the forward kernel, record the backward.

Each op is a function `op(tape, ...) -> Tensor` with its backward `_op_backward(k, ...)`
right below it. Inputs are Tensors (activations or parameters); integer inputs (token
ids, targets) are NumPy int32 arrays, validated here so no kernel can index out of bounds.
Backward functions accumulate (+=) into the grads of their inputs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .tape import Tape
from .tensor import Tensor

__all__ = ["embedding", "linear", "layernorm", "gelu", "add", "attention", "cross_entropy"]

_EMPTY: dict = {}


def _none(k, dtype, width: int = 0):
    """A zero-length array standing for an absent input (no bias, no positions).

    Made once per (device, dtype, width) so the steady state allocates nothing.
    """
    key = (k.DEVICE, np.dtype(dtype), width)
    if key not in _EMPTY:
        _EMPTY[key] = k.empty(0, dtype) if width == 0 else k.empty(0, dtype).reshape(0, width)
    return _EMPTY[key]


def _check(x: Tensor, name: str, ndim: Optional[int] = None, t: Optional[Tape] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an nt Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
    if t is not None and x.dtype != t.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the tape computes in {t.dtype}")


def _check_ids(ids, name: str, upper: int, ndim: int, ignore_index: bool = False) -> np.ndarray:
    """Token ids / targets as a C-contiguous int32 array, every value in [0, upper)
    (or -1, the ignore index, when `ignore_index`)."""
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a NumPy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    if ids.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {ids.shape}")
    if ids.dtype != np.int32 or not ids.flags.c_contiguous:
        ids = np.ascontiguousarray(ids, dtype=np.int32)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        low_ok = -1 if ignore_index else 0
        if lo < low_ok or hi >= upper:
            bad = lo if lo < low_ok else hi
            allowed = f"[0, {upper})" + (" or -1 (ignored)" if ignore_index else "")
            raise ValueError(f"{name} holds {bad}, outside {allowed}")
    return ids


# ----------------------------------------------------------------------------- embedding

def embedding(t: Tape, ids: np.ndarray, wte: Tensor, wpe: Optional[Tensor] = None, pos0: int = 0) -> Tensor:
    """out[b, t] = wte[ids[b, t]] (+ wpe[pos0 + t]): token (+ learned position) embedding."""
    _check(wte, "wte", 2, t)
    V, C = wte.shape
    ids = _check_ids(ids, "ids", V, 2)
    B, T = ids.shape
    if wpe is not None:
        _check(wpe, "wpe", 2, t)
        if wpe.shape[1] != C:
            raise ValueError(f"wpe has width {wpe.shape[1]}, wte has {C}")
        if pos0 < 0 or pos0 + T > wpe.shape[0]:
            raise ValueError(f"positions {pos0}..{pos0 + T - 1} exceed the model's maximum "
                             f"sequence length {wpe.shape[0]}")
    out = t.new((B, T, C))
    t.k.embedding_forward(out.data, ids, wte.data, wpe.data if wpe is not None else _none(t.k, t.dtype, C), pos0)
    t.record(_embedding_backward, out, ids, wte, wpe, pos0)
    return out


def _embedding_backward(k, out, ids, wte, wpe, pos0):
    C = wte.shape[1]
    dwpe = wpe.grad if wpe is not None else _none(k, wte.dtype, C)
    k.embedding_backward(wte.grad, dwpe, out.grad, ids, pos0)


# ----------------------------------------------------------------------------- linear

def linear(t: Tape, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out = x @ weight^T + bias over the last axis; weight is (OC, C) as in llm.c."""
    _check(x, "x", None, t)
    _check(weight, "weight", 2, t)
    OC, C = weight.shape
    if x.shape[-1] != C:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {C} (weight {weight.shape})")
    if bias is not None:
        _check(bias, "bias", 1, t)
        if bias.shape[0] != OC:
            raise ValueError(f"linear: bias has {bias.shape[0]} entries, weight has {OC} outputs")
    N = x.size // C
    out = t.new(x.shape[:-1] + (OC,))
    t.k.matmul_forward(out.data.reshape(N, OC), x.data.reshape(N, C), weight.data,
                       bias.data if bias is not None else _none(t.k, t.dtype))
    t.record(_linear_backward, out, x, weight, bias)
    return out


def _linear_backward(k, out, x, weight, bias):
    OC, C = weight.shape
    N = x.size // C
    dbias = bias.grad if bias is not None else _none(k, weight.dtype)
    k.matmul_backward(x.grad.reshape(N, C), weight.grad, dbias, out.grad.reshape(N, OC),
                      x.data.reshape(N, C), weight.data)


# ----------------------------------------------------------------------------- layernorm

def layernorm(t: Tape, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Normalise the last axis to zero mean, unit variance; scale by weight, shift by bias."""
    _check(x, "x", None, t)
    _check(weight, "weight", 1, t)
    C = x.shape[-1]
    if weight.shape[0] != C or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"layernorm: x has {C} features, weight {weight.shape}, bias {bias and bias.shape}")
    N = x.size // C
    out = t.new(x.shape)
    mean = t.new_saved((N,))
    rstd = t.new_saved((N,))
    t.k.layernorm_forward(out.data.reshape(N, C), mean.data, rstd.data, x.data.reshape(N, C),
                          weight.data, bias.data if bias is not None else _none(t.k, t.dtype), eps)
    t.record(_layernorm_backward, out, x, weight, bias, mean, rstd)
    return out


def _layernorm_backward(k, out, x, weight, bias, mean, rstd):
    C = x.shape[-1]
    N = x.size // C
    dbias = bias.grad if bias is not None else _none(k, weight.dtype)
    k.layernorm_backward(x.grad.reshape(N, C), weight.grad, dbias, out.grad.reshape(N, C),
                         x.data.reshape(N, C), weight.data, mean.data, rstd.data)


# ----------------------------------------------------------------------------- pointwise

def gelu(t: Tape, x: Tensor) -> Tensor:
    """GELU with GPT-2's tanh approximation."""
    _check(x, "x", None, t)
    out = t.new(x.shape)
    t.k.gelu_forward(out.flat, x.flat)
    t.record(_gelu_backward, out, x)
    return out


def _gelu_backward(k, out, x):
    k.gelu_backward(x.gflat, out.gflat, x.flat)


def add(t: Tape, a: Tensor, b: Tensor) -> Tensor:
    """a + b, same shapes (the residual connection)."""
    _check(a, "a", None, t)
    _check(b, "b", None, t)
    if a.shape != b.shape:
        raise ValueError(f"add: shapes {a.shape} and {b.shape} differ")
    out = t.new(a.shape)
    t.k.add_forward(out.flat, a.flat, b.flat)
    t.record(_add_backward, out, a, b)
    return out


def _add_backward(k, out, a, b):
    k.add_backward(a.gflat, b.gflat, out.gflat)


# ----------------------------------------------------------------------------- attention

def attention(t: Tape, qkv: Tensor, n_head: int, n_kv_head: Optional[int] = None, window: int = 0) -> Tensor:
    """Causal scaled-dot-product attention on a fused (B, T, (NH + 2*NKV) * hs) qkv tensor.

    Returns (B, T, NH * hs). n_kv_head < n_head is grouped-query attention; window > 0
    lets each position see only the last `window` positions (itself included).
    """
    _check(qkv, "qkv", 3, t)
    NH = int(n_head)
    NKV = NH if n_kv_head is None else int(n_kv_head)
    if NH <= 0 or NKV <= 0 or NH % NKV:
        raise ValueError(f"attention: n_kv_head ({NKV}) must divide n_head ({NH}), both positive")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = unlimited), got {window}")
    B, T, W = qkv.shape
    if W % (NH + 2 * NKV):
        raise ValueError(f"attention: qkv width {W} is not (n_head + 2*n_kv_head) * head_size "
                         f"for n_head={NH}, n_kv_head={NKV}")
    hs = W // (NH + 2 * NKV)
    out = t.new((B, T, NH * hs))
    lse = t.new_saved((B, NH, T))
    t.k.attention_forward(out.data, lse.data, qkv.data, NH, NKV, window)
    t.record(_attention_backward, out, qkv, lse, NH, NKV, window)
    return out


def _attention_backward(k, out, qkv, lse, NH, NKV, window):
    k.attention_backward(qkv.grad, out.grad, qkv.data, out.data, lse.data, NH, NKV, window)


# ----------------------------------------------------------------------------- loss

def cross_entropy(t: Tape, logits: Tensor, targets: np.ndarray, vocab_size: Optional[int] = None) -> Tensor:
    """Mean softmax cross-entropy over positions whose target is not -1.

    logits (..., Vp) may be padded past the real vocabulary `vocab_size` (V <= Vp);
    padded columns take no part. Returns a (1,) tensor holding the mean loss.
    """
    _check(logits, "logits", None, t)
    Vp = logits.shape[-1]
    V = Vp if vocab_size is None else int(vocab_size)
    if not 0 < V <= Vp:
        raise ValueError(f"cross_entropy: vocab_size {V} must be in [1, {Vp}] (the logits' width)")
    N = logits.size // Vp
    targets = _check_ids(targets, "targets", V, len(logits.shape) - 1, ignore_index=True)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets {targets.shape} do not match logits {logits.shape[:-1]}")
    loss = t.new((1,))
    losses = t.new_saved((N,))
    lse = t.new_saved((N,))
    flat_targets = targets.reshape(N)
    t.k.softmax_xent_forward(loss.data, losses.data, lse.data, logits.data.reshape(N, Vp), flat_targets, V)
    t.record(_cross_entropy_backward, loss, logits, lse, flat_targets, V)
    return loss


def _cross_entropy_backward(k, loss, logits, lse, targets, V):
    Vp = logits.shape[-1]
    N = logits.size // Vp
    k.softmax_xent_backward(logits.grad.reshape(N, Vp), loss.grad, logits.data.reshape(N, Vp),
                            lse.data, targets, V)
