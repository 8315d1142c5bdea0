"""Ops: check inputs, take outputs from the tape, run the forward kernel, record the backward.

Each op is a function `op(tape, ...) -> Tensor` with its backward `_op_backward(k, ...)`
right below it. Inputs are Tensors (activations or parameters); integer inputs (token
ids, targets) are NumPy integer arrays, validated here so no kernel can index out of
bounds, then copied into the tape (tape.keep_ids) so the backward never reads an array
the caller has since reused.
Backward functions accumulate (+=) into the grads of their inputs.
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np

from .tape import Tape
from .tensor import Tensor

__all__ = ["embedding", "linear", "lora_", "layernorm", "rmsnorm", "qk_norm", "rope", "gelu", "silu", "sigmoid",
           "glu", "glu_linear", "rmsnorm_linear", "swiglu", "geglu", "softmax", "add", "residual_", "mul", "scale", "concat", "dropout", "attention",
           "cross_entropy", "classifier_xent", "linear_q", "token_logprobs", "sum_rows", "sequence_logprobs", "kl_div",
           "residual_layernorm_", "gelu_mlp"]

_EMPTY: dict = {}


def _none(k, dtype, width: int = 0):
    """A zero-length array standing for an absent input (no bias, no positions).

    Made once per (device, dtype, width) so the steady state allocates nothing.
    """
    key = (k.DEVICE, np.dtype(dtype), width)
    if key not in _EMPTY:
        _EMPTY[key] = k.empty(0, dtype) if width == 0 else k.empty(0, dtype).reshape(0, width)
    return _EMPTY[key]


def _grad(k, x: Optional[Tensor]):
    """x's gradient, or an empty array of the same rank when x is absent or frozen (a
    parameter without a grad slot): kernels skip a gradient they are handed empty."""
    if x is not None and x.grad is not None:
        return x.grad
    return _none(k, x.dtype if x is not None else np.float32, x.shape[-1] if x is not None and x.ndim == 2 else 0)


def _check(x: Tensor, name: str, ndim: Optional[int] = None, t: Optional[Tape] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an nt Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
    if t is not None and x.dtype != t.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the tape computes in {t.dtype}")
    if t is not None and t.recording and x.arena is t.saved:
        raise ValueError(f"{name} has no gradient (e.g. classifier_xent's logits, which their backward "
                         "overwrites): compute the logits with linear when another op differentiates them")


def check_ids(ids, name: str, upper: int, ndim: Optional[int] = None, ignore_index: bool = False) -> np.ndarray:
    """Token ids / targets validated in the caller's own integer type, before any cast:
    every value in [0, upper), or -1 (the ignore index) when `ignore_index`. Returns the
    array unchanged; id 2**32 + 5 must not become id 5 by a cast to int32."""
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a NumPy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    if ndim is not None and ids.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {ids.shape}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())  # Python ints: exact for every integer dtype
        low_ok = -1 if ignore_index else 0
        if lo < low_ok or hi >= upper:
            bad = lo if lo < low_ok else hi
            where = np.unravel_index(int(np.argmax((ids < low_ok) | (ids >= upper))), ids.shape)
            allowed = f"[0, {upper})" + (" or -1 (ignored)" if ignore_index else "")
            raise ValueError(f"{name} holds {bad} at index {tuple(int(i) for i in where)}, outside {allowed}")
    return ids


# ----------------------------------------------------------------------------- embedding

def embedding(t: Tape, ids: np.ndarray, wte: Tensor, wpe: Optional[Tensor] = None, pos0: int = 0) -> Tensor:
    """out[b, t] = wte[ids[b, t]] (+ wpe[pos0 + t]): token (+ learned position) embedding."""
    _check(wte, "wte", 2, t)
    V, C = wte.shape
    ids = t.keep_ids(check_ids(ids, "ids", V, 2))
    B, T = ids.shape
    if wpe is not None:
        _check(wpe, "wpe", 2, t)
        if wpe.shape[1] != C:
            raise ValueError(f"wpe has width {wpe.shape[1]}, wte has {C}")
        if pos0 < 0 or pos0 + T > wpe.shape[0]:
            raise ValueError(f"positions {pos0}..{pos0 + T - 1} exceed the model's maximum "
                             f"sequence length {wpe.shape[0]}")
    out = t.new((B, T, C))
    t.k.embedding_forward(out.data, ids.data, wte.data, wpe.data if wpe is not None else _none(t.k, t.dtype, C), pos0)
    t.record(_embedding_backward, out, ids, wte, wpe, pos0)
    return out


def _embedding_backward(k, out, ids, wte, wpe, pos0):
    dwte, dwpe = _grad(k, wte), _grad(k, wpe) if wpe is not None else _none(k, wte.dtype, wte.shape[1])
    if dwte.shape[0] or dwpe.shape[0]:  # nothing to do when the tables are frozen
        k.embedding_backward(dwte, dwpe, out.grad, ids.data, pos0)


# ----------------------------------------------------------------------------- linear

def linear(t: Tape, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           transposed: bool = False) -> Tensor:
    """out = x @ weight^T + bias over the last axis; weight is (OC, C) as in llm.c.

    transposed=True: weight is (C, OC) and out = x @ weight + bias (e.g. a tied
    (V, C) embedding used to map V-wide inputs back to C).
    """
    _check(x, "x", None, t)
    _check(weight, "weight", 2, t)
    transposed = bool(transposed)
    C, OC = weight.shape if transposed else weight.shape[::-1]
    if x.shape[-1] != C:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {C} "
                         f"(weight {weight.shape}{', transposed' if transposed else ''})")
    if bias is not None:
        _check(bias, "bias", 1, t)
        if bias.shape[0] != OC:
            raise ValueError(f"linear: bias has {bias.shape[0]} entries, weight has {OC} outputs")
    N = x.size // C
    out = t.new(x.shape[:-1] + (OC,))
    t.k.matmul_forward(out.data.reshape(N, OC), x.data.reshape(N, C), weight.data,
                       bias.data if bias is not None else _none(t.k, t.dtype), transposed)
    t.record(_linear_backward, out, x, weight, bias, transposed)
    return out


def _linear_backward(k, out, x, weight, bias, transposed):
    C, OC = x.shape[-1], out.shape[-1]
    N = x.size // C
    # a frozen weight gets no gradient: only the dx gemm runs
    k.matmul_backward(x.grad.reshape(N, C), _grad(k, weight), _grad(k, bias), out.grad.reshape(N, OC),
                      x.data.reshape(N, C), weight.data, transposed)


# ----------------------------------------------------------------------------- LoRA

def _check_adapters(t: Tape, A: Tensor, B: Tensor, scale: float, parts: np.ndarray, C: int, OC: int, op: str) -> None:
    """A (G r, C) and B (sum of rows, r) stack G adapters whose parts (G, 2) int64 = (first
    column, rows) lie inside an OC-wide output: checked so no kernel indexes out of bounds."""
    _check(A, "A", 2, t)
    _check(B, "B", 2, t)
    Gr, r = A.shape[0], B.shape[1]
    if A.shape[1] != C:
        raise ValueError(f"{op}: adapter A {A.shape} does not read the input's {C} features")
    if not (isinstance(parts, np.ndarray) and parts.dtype == np.int64 and parts.ndim == 2 and parts.shape[1] == 2
            and parts.shape[0] > 0 and parts.flags.c_contiguous):
        raise ValueError(f"{op}: parts must be a C-contiguous (G, 2) int64 array of (first column, rows)")
    o0s, rows = parts[:, 0], parts[:, 1]
    if r < 1 or Gr != parts.shape[0] * r or int(rows.sum()) != B.shape[0]:
        raise ValueError(f"{op}: A {A.shape} and B {B.shape} do not stack {parts.shape[0]} adapters of "
                         f"rows {rows.tolist()}")
    if np.any(rows < 1) or np.any(o0s < 0) or np.any(o0s + rows > OC):
        raise ValueError(f"{op}: column blocks {parts.tolist()} are outside the output's {OC}")
    if not np.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def lora_(t: Tape, out: Tensor, xa: Tensor, A: Tensor, B: Tensor, scale: float, parts: np.ndarray) -> Tensor:
    """Add G LoRA adapters that read the same input into a linear's output, in place, and
    return `out`:

        h = xa @ A^T;  out[..., o0_g:o0_g+rows_g] += scale * h[:, g r:(g+1) r] @ B_g^T

    A (G r, C) stacks the adapters' A matrices, B (sum of rows_g, r) their B matrices, and
    parts (G, 2) int64 holds each one's (o0_g, rows_g): the column block of a fused output
    it adds to (q, k and v of a fused qkv; gate and up). xa is the adapters' input (the
    linear's input, or a dropout of it). The gemms over C run once for the group, B @ A is
    never formed. The backward gives xa, A and B their grads from out's grad, which the
    base linear reads too (the sum's grad reaches both terms unchanged). Call it right
    after the linear that made `out`, before anything reads it."""
    _check(out, "out", None, t)
    _check(xa, "xa", None, t)
    _check(A, "A", 2, t)
    Gr, C = A.shape
    OC = out.shape[-1]
    if xa.shape[-1] != C or xa.shape[:-1] != out.shape[:-1]:
        raise ValueError(f"lora_: adapter input {xa.shape} does not fit A {A.shape} and out {out.shape}")
    _check_adapters(t, A, B, scale, parts, C, OC, "lora_")
    N = out.size // OC
    h = t.new_saved((N, Gr))    # xa @ A^T, for B's grad
    t.k.lora_forward(out.data.reshape(N, OC), h.data, xa.data.reshape(N, C), A.data, B.data, float(scale), parts)
    t.record(_lora_backward, out, xa, A, B, h, float(scale), parts, t)
    return out


def _lora_backward(k, out, xa, A, B, h, scale, parts, t):
    C, OC = A.shape[1], out.shape[-1]
    N = out.size // OC
    dh = t.work(h.shape)   # the grad of h lives only inside this call: the tape's scratch, not a slot per adapter
    k.lora_backward(xa.grad.reshape(N, C), _grad(k, A), _grad(k, B), dh, out.grad.reshape(N, OC),
                    h.data, xa.data.reshape(N, C), A.data, B.data, scale, parts)


# ----------------------------------------------------------------------------- layernorm

# ggml block formats linear_q reads: (elements per block, bytes per block, dequantiser kernel)
QUANT_FORMATS = {"Q8_0": (32, 34, "dequantize_q8_0"), "Q4_0": (32, 18, "dequantize_q4_0"),
                 "Q4_K": (256, 144, "dequantize_q4_k"), "Q6_K": (256, 210, "dequantize_q6_k"),
                 "Q5_0": (32, 22, "dequantize_q5_0")}
# From this many rows on (a prompt's prefill) linear_q expands the weight into the tape's
# scratch and multiplies with BLAS (compute-bound: sgemm beats the integer kernels there).
DEQUANT_ROWS = 16


def linear_q(t: Tape, x: Tensor, wq: np.ndarray, kind: str) -> Tensor:
    """out = x @ W^T for W (OC, C) kept in a ggml block format: `wq` is the (OC, C/block *
    bytes-per-block) uint8 rows that nt.io.gguf.quantize returns / a GGUF file stores, `kind`
    one of QUANT_FORMATS. Fewer than DEQUANT_ROWS rows (decoding): each row of x is quantised
    to int8 blocks (one scale per 32 or 256) and meets the weight blocks in integer dot
    products (kernels/cpu/quant.py, as llama.cpp does; the weight is never expanded). More
    (prefill): the weight is expanded into the tape's scratch (`tape.work`, OC x C float32,
    reused by every call) for one BLAS call.

    Inference only: the weight has no gradient, and a backward through this op raises
    RuntimeError.
    """
    _check(x, "x", None, t)
    if kind not in QUANT_FORMATS:
        raise ValueError(f"linear_q: kind must be one of {sorted(QUANT_FORMATS)}, got {kind!r}")
    bs, ts, dequantize = QUANT_FORMATS[kind]
    qk = getattr(t.k, "quant", None)          # the backend's block-format kernels (kernels/*/quant.py)
    dequant = getattr(qk, dequantize, None)
    int_matmul = getattr(qk, "matmul_qdot", None)   # integer dots on int8 activations (CPU)
    block_matmul = getattr(qk, f"matmul_{kind.lower()}", None)   # float activations (Q8_0 / Q4_0)
    if dequant is None or not (int_matmul or block_matmul):
        raise NotImplementedError(f"linear_q: the {t.k.DEVICE} backend has no {kind} matmul")
    if t.dtype != np.float32:
        raise TypeError(f"linear_q computes in float32, the tape is {t.dtype}")
    C = x.shape[-1]
    if C % bs:
        raise ValueError(f"linear_q: x has {C} features, not a multiple of the {kind} block size {bs}")
    if isinstance(wq, np.ndarray) != (t.k.DEVICE == "cpu"):  # a host array on CUDA would be re-uploaded per call
        raise TypeError(f"linear_q: wq must live on the tape's device ({t.k.DEVICE}), got {type(wq).__name__}")
    if wq.dtype != np.uint8 or wq.ndim != 2 or wq.shape[1] != C // bs * ts or not wq.flags["C_CONTIGUOUS"]:
        raise ValueError(f"linear_q: wq must be C-contiguous uint8 (OC, {C // bs * ts}) {kind} rows for "
                         f"C={C}, got {getattr(wq, 'dtype', type(wq))} {getattr(wq, 'shape', '')}")
    OC, N = wq.shape[0], x.size // C
    out = t.new(x.shape[:-1] + (OC,))
    if N >= DEQUANT_ROWS:
        w = t.work((OC, C))
        dequant(w.reshape(-1), wq.reshape(-1), t.k.F16_TABLE)
        t.k.matmul_forward(out.data.reshape(N, OC), x.data.reshape(N, C), w, _none(t.k, t.dtype), False)
    elif int_matmul is not None:
        xq = np.empty((N, C), np.int8)                   # the activation rows as int8 blocks
        xd, xs = np.empty((N, C // bs), np.float32), np.empty((N, C // 32), np.int32)
        qk.quantize_rows_q8(xq, xd, xs, x.data.reshape(N, C), bs)
        int_matmul(out.data.reshape(N, OC), xq, xd, xs, wq, qk.QDOT_CODES[kind])
    else:   # a backend with float-activation block kernels only
        lanes = t.work((numba.config.NUMBA_NUM_THREADS, bs))  # 32 accumulation lanes per thread
        block_matmul(out.data.reshape(N, OC), x.data.reshape(N, C), wq, t.k.F16_TABLE, lanes)
    t.record(_linear_q_backward, kind)
    return out


def _linear_q_backward(k, kind):
    raise RuntimeError(f"linear_q ({kind} weights) is forward-only: a model with quantised weights can "
                       "run inference but not backward(); load it with keep_quantized=False to train")


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
    # the residual kernel with an empty residual: on the CPU a step then compiles one
    # layernorm kernel, not also the plain entry point wrapped around it (~0.3-0.6 s each)
    t.k.residual_layernorm_forward(out.data.reshape(N, C), mean.data, rstd.data, x.data.reshape(N, C),
                                   _none(t.k, t.dtype, C), weight.data,
                                   bias.data if bias is not None else _none(t.k, t.dtype), eps)
    t.record(_layernorm_backward, out, x, weight, bias, mean, rstd)
    return out


def _layernorm_backward(k, out, x, weight, bias, mean, rstd):
    C = x.shape[-1]
    N = x.size // C
    k.residual_layernorm_backward(x.grad.reshape(N, C), _none(k, x.dtype, C), _grad(k, weight), _grad(k, bias),
                                  out.grad.reshape(N, C), x.data.reshape(N, C), weight.data, mean.data, rstd.data)


def residual_layernorm_(t: Tape, h: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """residual_(h, x) then layernorm of the sum, as one kernel pass per row (a pre-LN
    block's `x = x + h; n = ln(x)`). Returns (sum, normed): the sum lives in h's memory
    (h's value must be one no backward reads, as for residual_), normed is a new tensor.
    The backward is one pass too: the sum's grad gets the norm's input grad, then x's
    grad gets the sum's. Equal bit for bit to residual_ then layernorm."""
    _check_pair(t, h, x, "residual_layernorm_")
    if h.arena is not t.acts:
        raise ValueError("residual_layernorm_: h must be an op output on this tape (it is overwritten in place)")
    _check(weight, "weight", 1, t)
    C = x.shape[-1]
    if weight.shape[0] != C or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"residual_layernorm_: x has {C} features, weight {weight.shape}, "
                         f"bias {bias and bias.shape}")
    N = x.size // C
    out = t.new(x.shape)
    mean = t.new_saved((N,))
    rstd = t.new_saved((N,))
    t.k.residual_layernorm_forward(out.data.reshape(N, C), mean.data, rstd.data, h.data.reshape(N, C),
                                   x.data.reshape(N, C), weight.data,
                                   bias.data if bias is not None else _none(t.k, t.dtype), eps)
    t.record(_residual_layernorm_backward, out, h, x, weight, bias, mean, rstd)
    return h, out


def _residual_layernorm_backward(k, out, h, x, weight, bias, mean, rstd):
    C = x.shape[-1]
    N = x.size // C
    k.residual_layernorm_backward(h.grad.reshape(N, C), x.grad.reshape(N, C), _grad(k, weight), _grad(k, bias),
                                  out.grad.reshape(N, C), h.data.reshape(N, C), weight.data, mean.data, rstd.data)


# ----------------------------------------------------------------------------- rmsnorm

def rmsnorm(t: Tape, x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """out = x / sqrt(mean(x^2) + eps) * weight over the last axis (LLaMA's norm)."""
    _check(x, "x", None, t)
    _check(weight, "weight", 1, t)
    C = x.shape[-1]
    if weight.shape[0] != C:
        raise ValueError(f"rmsnorm: x has {C} features, weight has shape {weight.shape}")
    if not eps > 0:
        raise ValueError(f"rmsnorm: eps must be positive, got {eps}")
    N = x.size // C
    out = t.new(x.shape)
    rstd = t.new_saved((N,))
    t.k.rmsnorm_forward(out.data.reshape(N, C), rstd.data, x.data.reshape(N, C), weight.data, float(eps))
    t.record(_rmsnorm_backward, out, x, weight, rstd, t)
    return out


def _rmsnorm_backward(k, out, x, weight, rstd, t):
    C = x.shape[-1]
    N = x.size // C
    k.rmsnorm_backward(x.grad.reshape(N, C), _grad(k, weight), out.grad.reshape(N, C),
                       x.data.reshape(N, C), weight.data, rstd.data, t.work((N, C)))


def _qkv_heads(t: Tape, qkv: Tensor, n_head: int, n_kv_head: Optional[int], op: str) -> tuple[int, int, int]:
    """(NH, NKV, hs) of a fused (B, T, (NH + 2*NKV) * hs) qkv tensor, validated."""
    _check(qkv, "qkv", 3, t)
    NH = int(n_head)
    NKV = NH if n_kv_head is None else int(n_kv_head)
    if NH <= 0 or NKV <= 0 or NH % NKV:
        raise ValueError(f"{op}: n_kv_head ({NKV}) must divide n_head ({NH}), both positive")
    W = qkv.shape[2]
    if W % (NH + 2 * NKV):
        raise ValueError(f"{op}: qkv width {W} is not (n_head + 2*n_kv_head) * head_size "
                         f"for n_head={NH}, n_kv_head={NKV}")
    return NH, NKV, W // (NH + 2 * NKV)


def qk_norm(t: Tape, qkv: Tensor, q_weight: Tensor, k_weight: Tensor, n_head: int,
            n_kv_head: Optional[int] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm of every query head (weight q_weight, size head_size, shared by the heads)
    and key head (k_weight) of a fused qkv tensor, values copied (Qwen3, Gemma-3)."""
    NH, NKV, hs = _qkv_heads(t, qkv, n_head, n_kv_head, "qk_norm")
    for w, name in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        _check(w, name, 1, t)
        if w.shape[0] != hs:
            raise ValueError(f"qk_norm: {name} has shape {w.shape}, the head size is {hs}")
    if not eps > 0:
        raise ValueError(f"qk_norm: eps must be positive, got {eps}")
    B, T, _ = qkv.shape
    out = t.new(qkv.shape)
    rstd = t.new_saved((B, T, NH + NKV))
    t.k.qk_norm_forward(out.data, rstd.data, qkv.data, q_weight.data, k_weight.data, NH, NKV, float(eps))
    t.record(_qk_norm_backward, out, qkv, q_weight, k_weight, rstd, NH, NKV)
    return out


def _qk_norm_backward(k, out, qkv, q_weight, k_weight, rstd, NH, NKV):
    k.qk_norm_backward(qkv.grad, _grad(k, q_weight), _grad(k, k_weight), out.grad, qkv.data, q_weight.data,
                       k_weight.data, rstd.data, NH, NKV)


# ----------------------------------------------------------------------------- rope

ROPE_PAIRINGS = ("half", "interleaved")
_ROPE_TABLES: dict = {}


def rope_frequencies(hs: int, theta: float, scaling: Optional[tuple] = None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/hs), i < hs/2, in float64.

    scaling = (factor, low_freq_factor, high_freq_factor, original_context) applies
    Llama-3's rule: wavelengths shorter than original_context / high_freq_factor keep
    their frequency, longer than original_context / low_freq_factor are divided by
    factor, and those between are interpolated smoothly.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs)
    if scaling is None:
        return inv_freq
    factor, low, high, context = (float(v) for v in scaling)
    if not (factor > 0 and 0 < low < high and context > 0):
        raise ValueError(f"rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor "
                         f"and original_context > 0, got {scaling}")
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _rope_tables(k, hs: int, theta: float, scaling: Optional[tuple], pos0: int, T: int) -> tuple:
    """The kernels' float64 cos/sin tables (T, hs) of the angles (pos0 + t) * inv_freq[i]:
    row t is [cos | sin], and the inverse rotation's table has the sines negated. One pair
    per (device, hs, theta, scaling) is kept and remade when the positions change: training
    makes it once for every layer and step, a decode a one-row pair per token. A remade
    pair is a new array, so a recorded backward keeps the table of its own forward."""
    key = (k.DEVICE, hs, theta, scaling)
    entry = _ROPE_TABLES.get(key)
    if entry is None or entry[0] != (pos0, T):
        angles = np.outer(np.arange(pos0, pos0 + T, dtype=np.float64), rope_frequencies(hs, theta, scaling))
        cos, sin = np.cos(angles), np.sin(angles)
        entry = ((pos0, T), k.to_device(np.concatenate([cos, sin], 1)), k.to_device(np.concatenate([cos, -sin], 1)))
        _ROPE_TABLES[key] = entry
    return entry[1], entry[2]


def _rope_args(t: Tape, qkv: Tensor, n_head: int, n_kv_head: Optional[int], pos0: int, theta: float,
               pairing: str, scaling: Optional[tuple], name: str) -> tuple:
    """rope_forward's arguments after (out, qkv), checked; and the inverse rotation's table."""
    NH, NKV, hs = _qkv_heads(t, qkv, n_head, n_kv_head, name)
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"{name}: pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
    if hs % 2:
        raise ValueError(f"{name}: head size {hs} must be even")
    if pos0 < 0 or not theta > 0:
        raise ValueError(f"{name}: need pos0 >= 0 and theta > 0, got pos0={pos0}, theta={theta}")
    scaling = None if scaling is None else tuple(float(v) for v in scaling)
    table, inverse = _rope_tables(t.k, hs, float(theta), scaling, int(pos0), qkv.shape[1])
    return (NH, NKV, table, pairing == "half"), inverse


def rope(t: Tape, qkv: Tensor, n_head: int, n_kv_head: Optional[int] = None, pos0: int = 0,
         theta: float = 10000.0, pairing: str = "half", scaling: Optional[tuple] = None) -> Tensor:
    """Rotary position embedding of the q and k heads of a fused qkv tensor (v copied).

    Position pos0 + t rotates channel pair i of each head by (pos0 + t) * theta^(-2i/hs)
    (frequencies rescaled by `scaling`, see rope_frequencies). pairing "half": pairs
    (i, i + hs/2) (HF transformers, GPT-NeoX); "interleaved": pairs (2i, 2i + 1) (Meta's
    LLaMA reference, RoFormer, llama.cpp's LLAMA arch).
    """
    args, _ = _rope_args(t, qkv, n_head, n_kv_head, pos0, theta, pairing, scaling, "rope")
    out = t.new(qkv.shape)
    t.k.copy_(out.data, qkv.data)
    t.k.rope_forward(out.data, *args)   # rotates in place
    t.record(_rope_backward, out, qkv, args)
    return out


def _rope_backward(k, out, qkv, args):
    k.rope_backward(qkv.grad, out.grad, *args)


def rope_(t: Tape, qkv: Tensor, n_head: int, n_kv_head: Optional[int] = None, pos0: int = 0,
          theta: float = 10000.0, pairing: str = "half", scaling: Optional[tuple] = None) -> Tensor:
    """rope() in qkv's own memory; returns qkv. Saves a (B, T, W) activation and its grad
    (118 MiB at SmolLM2-135M B=4 T=256). The rotation needs no input in its backward, so
    the shared grad slot is rotated back in place (the same kernel with negated angles).
    qkv's unrotated value is gone: it must be an op output no backward reads (a linear's,
    qk_norm's), used by nothing but this op."""
    if qkv.arena is not t.acts:
        raise ValueError("rope_: qkv must be an op output on this tape (it is overwritten in place)")
    args, inverse = _rope_args(t, qkv, n_head, n_kv_head, pos0, theta, pairing, scaling, "rope_")
    t.k.rope_forward(qkv.data, *args)
    t.record(_rope_inplace_backward, qkv, args[:2] + (inverse,) + args[3:])
    return qkv


def _rope_inplace_backward(k, qkv, inverse_args):
    k.rope_forward(qkv.grad, *inverse_args)


# ----------------------------------------------------------------------------- pointwise

def _pointwise(t: Tape, x: Tensor, kind: int) -> Tensor:
    _check(x, "x", None, t)
    out = t.new(x.shape)
    t.k.act_forward(out.flat, x.flat, kind)
    t.record(_pointwise_backward, out, x, kind)
    return out


def _pointwise_backward(k, out, x, kind):
    k.act_backward(x.gflat, out.gflat, x.flat, kind)


def gelu(t: Tape, x: Tensor, approximate: bool = True) -> Tensor:
    """GELU: with GPT-2's tanh approximation (default), or exact x * Phi(x) (erf)."""
    if not approximate:
        return _pointwise(t, x, t.k.GELU)
    _check(x, "x", None, t)
    out = t.new(x.shape)
    t.k.gelu_forward(out.flat, x.flat)
    t.record(_gelu_backward, out, x)
    return out


def _gelu_backward(k, out, x):
    k.gelu_backward(x.gflat, out.gflat, x.flat)


def gelu_mlp(t: Tape, x: Tensor, fc_w: Tensor, fc_b: Optional[Tensor], proj_w: Tensor,
             proj_b: Optional[Tensor] = None) -> Tensor:
    """linear(gelu_tanh(linear(x, fc_w, fc_b)), proj_w, proj_b): GPT-2's MLP as one op. The
    fc matmul runs without bias; one elementwise pass adds the bias in place and writes the
    GELU output, which the proj matmul reads. Recording, that output is saved for the proj
    weight's grad (N x H floats a layer: GPT-2 d12 B=4 T=64 3 MiB, d6 B=8 T=256 12 MiB);
    recomputing it in the backward instead cost a GELU pass a layer, 0.5% of d6's step.
    Not recording, it goes to the tape's scratch. The (..., H) pre-activation is an
    activation for its grad. Equal to linear, gelu, linear up to the fc matmul's rounding
    of its bias add (tests/kernels/test_elementwise.py)."""
    _check(x, "x", None, t)
    _check(fc_w, "fc_w", 2, t)
    _check(proj_w, "proj_w", 2, t)
    H, C = fc_w.shape
    if x.shape[-1] != C:
        raise ValueError(f"gelu_mlp: x has {x.shape[-1]} features, fc_w {fc_w.shape} expects {C}")
    if proj_w.shape[1] != H:
        raise ValueError(f"gelu_mlp: proj_w {proj_w.shape} must take the {H} outputs of fc_w {fc_w.shape}")
    if fc_b is not None:
        _check(fc_b, "fc_b", 1, t)
        if fc_b.shape[0] != H:
            raise ValueError(f"gelu_mlp: fc_b has {fc_b.shape[0]} entries, fc_w has {H} outputs")
    if proj_b is not None:
        _check(proj_b, "proj_b", 1, t)
        if proj_b.shape[0] != proj_w.shape[0]:
            raise ValueError(f"gelu_mlp: proj_b has {proj_b.shape[0]} entries, proj_w has {proj_w.shape[0]} outputs")
    N = x.size // C
    pre = t.new(x.shape[:-1] + (H,))
    empty = _none(t.k, t.dtype)
    t.k.matmul_forward(pre.data.reshape(N, H), x.data.reshape(N, C), fc_w.data, empty, False)
    h = t.new_saved((N, H)) if t.recording else None
    hd = h.data if h is not None else t.work((N, H))
    t.k.bias_act_forward(hd, pre.data.reshape(N, H), fc_b.data if fc_b is not None else empty, t.k.GELU_TANH)
    out, _ = _scratch_linear(t, hd, x.shape[:-1], proj_w, proj_b, None, "gelu_mlp")
    t.record(_gelu_mlp_backward, out, pre, h, x, fc_w, fc_b, proj_w, proj_b, t)
    return out


def _gelu_mlp_backward(k, out, pre, h, x, fc_w, fc_b, proj_w, proj_b, t):
    C, H = x.shape[-1], pre.shape[-1]
    N = x.size // C
    pres = pre.data.reshape(N, H)           # holds the fc bias since the forward
    dh = t.work((N, H))
    _scratch_linear_grads(k, h.data, dh, None, out, proj_w, proj_b, None, None)
    dpre = pre.grad.reshape(N, H)           # zero until now: nothing else reads pre
    k.bias_act_backward(dpre, dh, pres, k.GELU_TANH)
    # the fc bias grad is summed by the matmul's backward, inside its pass over dpre: a separate
    # column-sum pass in the elementwise kernel rereads dpre (CPU: 3.1 -> 5.0 ms at N=2048, 4C=1536)
    k.matmul_backward(x.grad.reshape(N, C), _grad(k, fc_w), _grad(k, fc_b) if fc_b is not None else _none(k, x.dtype),
                      dpre, x.data.reshape(N, C), fc_w.data, False)


def silu(t: Tape, x: Tensor) -> Tensor:
    """SiLU (swish): x * sigmoid(x)."""
    return _pointwise(t, x, t.k.SILU)


def sigmoid(t: Tape, x: Tensor) -> Tensor:
    """1 / (1 + exp(-x))."""
    return _pointwise(t, x, t.k.SIGMOID)


GLU_ACTS = ("silu", "gelu_tanh", "gelu", "sigmoid")


def glu(t: Tape, x: Tensor, act: str = "silu") -> Tensor:
    """Gated linear unit on a fused (..., 2H) input: act(x[..., :H]) * x[..., H:] -> (..., H).

    The gate is the first half, the up projection the second (one fused gate_up linear).
    act "silu" is SwiGLU (LLaMA), "gelu_tanh" GeGLU (Gemma), "gelu" GeGLU with exact GELU.
    """
    _check(x, "x", None, t)
    if act not in GLU_ACTS:
        raise ValueError(f"glu: act must be one of {GLU_ACTS}, got {act!r}")
    if x.shape[-1] % 2:
        raise ValueError(f"glu: the last axis ({x.shape[-1]}) must be even: gate half then up half")
    kind = {"silu": t.k.SILU, "gelu_tanh": t.k.GELU_TANH, "gelu": t.k.GELU, "sigmoid": t.k.SIGMOID}[act]
    H = x.shape[-1] // 2
    N = x.size // (2 * H)
    out = t.new(x.shape[:-1] + (H,))
    t.k.glu_forward(out.data.reshape(N, H), x.data.reshape(N, 2 * H), kind)
    t.record(_glu_backward, out, x, kind)
    return out


def _glu_backward(k, out, x, kind):
    H = out.shape[-1]
    N = out.size // H
    k.glu_backward(x.grad.reshape(N, 2 * H), out.grad.reshape(N, H), x.data.reshape(N, 2 * H), kind)


# Ops whose linear reads an input that is not kept but recomputed in the backward (a GLU
# output, a norm output): the input lives in the tape's scratch in the forward, and again
# in the backward for the weight's and the adapters' gradients. The linear and its LoRA
# adapters (stacked as LoRA.group gives them, no dropout) are shared by both ops.

def _scratch_linear(t: Tape, inp, lead: tuple, weight: Tensor, bias: Optional[Tensor],
                    adapter: Optional[tuple], op: str) -> tuple[Tensor, Optional[Tensor]]:
    """out = inp (N, C) @ weight^T + bias, plus the adapters' term; returns (out, h), h the
    adapters' saved xa @ A^T (None without adapters)."""
    N, C = inp.shape
    OC = weight.shape[0]
    if bias is not None:
        _check(bias, "bias", 1, t)
        if bias.shape[0] != OC:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries, weight has {OC} outputs")
    out = t.new(lead + (OC,))
    t.k.matmul_forward(out.data.reshape(N, OC), inp, weight.data, bias.data if bias is not None else _none(t.k, t.dtype),
                       False)
    h = None
    if adapter is not None:
        A, B, scale, parts = adapter
        _check_adapters(t, A, B, scale, parts, C, OC, op)
        h = t.new_saved((N, A.shape[0]))
        t.k.lora_forward(out.data.reshape(N, OC), h.data, inp, A.data, B.data, float(scale), parts)
    return out, h


def _scratch_views(t: Tape, N: int, C: int, adapter: Optional[tuple]):
    """(inp, dinp, dh): the recomputed input (N, C), its grad (N, C) and the adapters' dh
    (N, G r), views of the tape's scratch for one backward call."""
    Gr = adapter[0].shape[0] if adapter is not None else 0
    work = t.work((2 * N * C + N * Gr,))
    return work[:N * C].reshape(N, C), work[N * C:2 * N * C].reshape(N, C), work[2 * N * C:].reshape(N, Gr)


def _scratch_linear_grads(k, inp, dinp, dh, out: Tensor, weight: Tensor, bias: Optional[Tensor],
                          adapter: Optional[tuple], h: Optional[Tensor]) -> None:
    """dinp = dout @ weight (+ the adapters' share); weight, bias and adapters accumulate
    their grads from the recomputed inp."""
    OC = weight.shape[0]
    N = out.size // OC
    dout = out.grad.reshape(N, OC)
    k.fill_(dinp.reshape(-1), 0.0)
    k.matmul_backward(dinp, _grad(k, weight), _grad(k, bias) if bias is not None else _none(k, inp.dtype), dout,
                      inp, weight.data, False)
    if adapter is not None:
        A, B, scale, parts = adapter
        k.lora_backward(dinp, _grad(k, A), _grad(k, B), dh, dout, h.data, inp, A.data, B.data, float(scale), parts)


def glu_linear(t: Tape, x: Tensor, weight: Tensor, act: str = "silu", adapter: Optional[tuple] = None) -> Tensor:
    """linear(glu(x, act), weight) (a gated MLP's down projection) without keeping the
    (..., H) GLU output: the backward recomputes it from x (the stored gate/up) into the
    tape's scratch, for weight's gradient and the adapters'. Saves N x H floats per MLP
    (SwiGLU at SmolLM2-135M B=4 T=256: 6 MiB a layer, 189 MiB in all) for one elementwise
    pass more. adapter: (A, B, scale, parts) of LoRA adapters on weight, as ops.lora_ takes
    them (LoRA.group; no dropout: their input is the GLU output itself). Equal to glu, then
    linear, then lora_ (tests/kernels/test_activations.py)."""
    _check(x, "x", None, t)
    _check(weight, "weight", 2, t)
    if act not in GLU_ACTS:
        raise ValueError(f"glu_linear: act must be one of {GLU_ACTS}, got {act!r}")
    OC, H = weight.shape
    if x.shape[-1] != 2 * H:
        raise ValueError(f"glu_linear: x has {x.shape[-1]} features, weight {weight.shape} needs 2 x {H} (gate | up)")
    kind = {"silu": t.k.SILU, "gelu_tanh": t.k.GELU_TANH, "gelu": t.k.GELU, "sigmoid": t.k.SIGMOID}[act]
    N = x.size // (2 * H)
    g = t.work((N, H))
    t.k.glu_forward(g, x.data.reshape(N, 2 * H), kind)
    out, h = _scratch_linear(t, g, x.shape[:-1], weight, None, adapter, "glu_linear")
    t.record(_glu_linear_backward, out, x, weight, kind, adapter, h, t)
    return out


def _glu_linear_backward(k, out, x, weight, kind, adapter, h, t):
    H = weight.shape[1]
    N = out.size // weight.shape[0]
    g, dg, dh = _scratch_views(t, N, H, adapter)
    xs = x.data.reshape(N, 2 * H)
    k.glu_forward(g, xs, kind)   # the recomputation
    _scratch_linear_grads(k, g, dg, dh, out, weight, None, adapter, h)
    k.glu_backward(x.grad.reshape(N, 2 * H), dg, xs, kind)


def rmsnorm_linear(t: Tape, x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                   bias: Optional[Tensor] = None, adapter: Optional[tuple] = None) -> Tensor:
    """linear(rmsnorm(x, norm_weight, eps), weight, bias) (a block's qkv or gate_up
    projection) without keeping the normed (..., C) input: the backward recomputes it from
    x (the residual stream, kept anyway) and the saved rstd. Saves N x C floats per norm
    (SmolLM2-135M B=4 T=256: 2 a layer, 141 MiB in all). adapter as for glu_linear.
    Equal to rmsnorm, then linear, then lora_ (tests/kernels/test_activations.py)."""
    _check(x, "x", None, t)
    _check(norm_weight, "norm_weight", 1, t)
    _check(weight, "weight", 2, t)
    C = x.shape[-1]
    if norm_weight.shape[0] != C or weight.shape[1] != C:
        raise ValueError(f"rmsnorm_linear: x has {C} features; norm weight {norm_weight.shape}, weight {weight.shape}")
    if not eps > 0:
        raise ValueError(f"rmsnorm_linear: eps must be positive, got {eps}")
    N = x.size // C
    normed = t.work((N, C))
    rstd = t.new_saved((N,))
    t.k.rmsnorm_forward(normed, rstd.data, x.data.reshape(N, C), norm_weight.data, float(eps))
    out, h = _scratch_linear(t, normed, x.shape[:-1], weight, bias, adapter, "rmsnorm_linear")
    t.record(_rmsnorm_linear_backward, out, x, norm_weight, float(eps), rstd, weight, bias, adapter, h, t)
    return out


def _rmsnorm_linear_backward(k, out, x, norm_weight, eps, rstd, weight, bias, adapter, h, t):
    C = x.shape[-1]
    N = x.size // C
    normed, dnormed, dh = _scratch_views(t, N, C, adapter)
    xs = x.data.reshape(N, C)
    k.rmsnorm_forward(normed, rstd.data, xs, norm_weight.data, eps)   # the recomputation (rstd: the same values)
    _scratch_linear_grads(k, normed, dnormed, dh, out, weight, bias, adapter, h)
    # normed is read by nothing after the weight's grad: the norm's scratch for its partial sums
    k.rmsnorm_backward(x.grad.reshape(N, C), _grad(k, norm_weight), dnormed, xs, norm_weight.data, rstd.data, normed)


def swiglu(t: Tape, x: Tensor) -> Tensor:
    """silu(gate) * up on a fused (..., 2H) [gate | up] input."""
    return glu(t, x, "silu")


def geglu(t: Tape, x: Tensor) -> Tensor:
    """gelu_tanh(gate) * up on a fused (..., 2H) [gate | up] input (Gemma)."""
    return glu(t, x, "gelu_tanh")


def softmax(t: Tape, x: Tensor) -> Tensor:
    """Softmax over the last axis."""
    _check(x, "x", None, t)
    C = x.shape[-1]
    N = x.size // C
    out = t.new(x.shape)
    t.k.softmax_forward(out.data.reshape(N, C), x.data.reshape(N, C))
    t.record(_softmax_backward, out, x)
    return out


def _softmax_backward(k, out, x):
    C = x.shape[-1]
    N = x.size // C
    k.softmax_backward(x.grad.reshape(N, C), out.grad.reshape(N, C), out.data.reshape(N, C))


def _check_pair(t: Tape, a: Tensor, b: Tensor, op: str) -> None:
    """Both operands of an elementwise op: tensors of the tape's dtype and the same shape."""
    _check(a, "a", None, t)
    _check(b, "b", None, t)
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} differ")


def add(t: Tape, a: Tensor, b: Tensor) -> Tensor:
    """a + b, same shapes (the residual connection)."""
    _check_pair(t, a, b, "add")
    out = t.new(a.shape)
    t.k.add_forward(out.flat, a.flat, b.flat)
    t.record(_add_backward, out, a, b)
    return out


def _add_backward(k, out, a, b):
    k.add_backward(a.gflat, b.gflat, out.gflat)


def residual_(t: Tape, h: Tensor, x: Tensor) -> Tensor:
    """The residual connection x + h computed in h's memory; returns h. Saves the (B, T, C)
    activation a new sum would take, and its grad: h's grad slot IS the sum's grad (d/dh
    of x + h is 1), so the backward only adds it into x's. h's own value is gone, so it
    must be one that no backward reads: a linear's output (its backward reads its input),
    a dropout's."""
    _check_pair(t, h, x, "residual_")
    if h.arena is not t.acts:
        raise ValueError("residual_: h must be an op output on this tape (it is overwritten in place)")
    t.k.add_forward(h.flat, h.flat, x.flat)
    t.record(_residual_backward, h, x)
    return h


def _residual_backward(k, h, x):
    # x's grad += the sum's, with the forward's kernel: one kernel fewer to compile
    k.add_forward(x.gflat, x.gflat, h.gflat)


def mul(t: Tape, a: Tensor, b: Tensor) -> Tensor:
    """a * b elementwise, same shapes."""
    _check_pair(t, a, b, "mul")
    out = t.new(a.shape)
    t.k.mul_forward(out.flat, a.flat, b.flat)
    t.record(_mul_backward, out, a, b)
    return out


def _mul_backward(k, out, a, b):
    k.mul_backward(a.gflat, b.gflat, out.gflat, a.flat, b.flat)


def scale(t: Tape, x: Tensor, s) -> Tensor:
    """s * x, where s is a Python number (a constant: no grad) or a (1,) Tensor (a learned
    scalar, which gets the grad sum(x * dout))."""
    _check(x, "x", None, t)
    if isinstance(s, Tensor):
        _check(s, "s", 1, t)
        if s.shape != (1,):
            raise ValueError(f"scale: a learned scale must have shape (1,), got {s.shape}")
        learned = True
    elif isinstance(s, (int, float, np.integer, np.floating)) and np.isfinite(s):
        value, s, learned = float(s), t.new_saved((1,)), False
        t.k.fill_(s.data, value)
    else:
        raise TypeError(f"scale: s must be a finite number or a (1,) Tensor, got {s!r}")
    out = t.new(x.shape)
    t.k.scale_forward(out.flat, x.flat, s.data)
    t.record(_scale_backward, out, x, s, learned)
    return out


def _scale_backward(k, out, x, s, learned):
    k.scale_backward(x.gflat, _grad(k, s) if learned else _none(k, x.dtype), out.gflat, x.flat, s.data)


def concat(t: Tape, a: Tensor, b: Tensor) -> Tensor:
    """[a | b] along the last (feature) axis; the leading axes must match."""
    _check(a, "a", None, t)
    _check(b, "b", None, t)
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"concat: leading shapes differ: {a.shape} and {b.shape}")
    Ca, Cb = a.shape[-1], b.shape[-1]
    if Ca == 0 or Cb == 0:
        raise ValueError(f"concat: both inputs need at least one feature, got {a.shape} and {b.shape}")
    N = a.size // Ca
    out = t.new(a.shape[:-1] + (Ca + Cb,))
    t.k.concat_forward(out.data.reshape(N, Ca + Cb), a.data.reshape(N, Ca), b.data.reshape(N, Cb))
    t.record(_concat_backward, out, a, b)
    return out


def _concat_backward(k, out, a, b):
    Ca, Cb = a.shape[-1], b.shape[-1]
    N = a.size // Ca
    k.concat_backward(a.grad.reshape(N, Ca), b.grad.reshape(N, Cb), out.grad.reshape(N, Ca + Cb))


def dropout(t: Tape, x: Tensor, p: float) -> Tensor:
    """Inverted dropout: in training, zero each element with probability p and scale the
    rest by 1/(1-p); the identity (x itself) when p == 0 or the tape is not training.

    The mask is a hash of (tape.seed, tape.step, this call's index in the forward,
    element index): reproducible, never stored, regenerated by the backward.
    """
    _check(x, "x", None, t)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if p == 0.0 or not t.training:
        return x
    key = np.uint64(t.rng_key())
    out = t.new(x.shape)
    t.k.dropout_forward(out.flat, x.flat, float(p), key)
    t.record(_dropout_backward, out, x, float(p), key)
    return out


def _dropout_backward(k, out, x, p, key):
    k.dropout_backward(x.gflat, out.gflat, p, key)


# ----------------------------------------------------------------------------- attention

def attention(t: Tape, qkv: Tensor, n_head: int, n_kv_head: Optional[int] = None, window: int = 0,
              q0: int = 0, causal: bool = True) -> Tensor:
    """Scaled-dot-product attention on a fused (B, T, (NH + 2*NKV) * hs) qkv tensor.

    Returns (B, T - q0, NH * hs). n_kv_head < n_head is grouped-query attention; window > 0
    lets each position see only the last `window` positions (itself included). q0 > 0
    makes rows 0..q0-1 a KV cache: only positions q0..T-1 are queries, attending keys
    0..T-1 (generation with a cache). causal=False is bidirectional attention (a vision
    transformer's or an encoder's): every query sees every key 0..T-1; a window is
    refused with it (a one-sided window has no meaning without an order).
    """
    NH, NKV, hs = _qkv_heads(t, qkv, n_head, n_kv_head, "attention")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = unlimited), got {window}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"attention: causal must be True or False, got {causal!r}")
    if not causal and window:
        raise ValueError(f"attention: a window ({window}) needs causal=True")
    B, T, W = qkv.shape
    if not 0 <= q0 < T:
        raise ValueError(f"attention: q0 ({q0}) must be in [0, T) for T={T}")
    q0, window, causal = int(q0), int(window), bool(causal)
    out = t.new((B, T - q0, NH * hs))
    lse = t.new_saved((B, NH, T - q0))
    work = t.work(t.k.attention_work_shape(T))
    t.k.attention_forward(out.data, lse.data, qkv.data, work, NH, NKV, window, q0, causal)
    t.record(_attention_backward, out, qkv, lse, work, NH, NKV, window, q0, causal)
    return out


def _attention_backward(k, out, qkv, lse, work, NH, NKV, window, q0, causal):
    k.attention_backward(qkv.grad, out.grad, qkv.data, out.data, lse.data, work, NH, NKV, window, q0, causal)


# ----------------------------------------------------------------------------- loss

def cross_entropy(t: Tape, logits: Tensor, targets: np.ndarray, vocab_size: Optional[int] = None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """Mean softmax cross-entropy over positions whose target is not -1.

    logits (..., Vp) may be padded past the real vocabulary `vocab_size` (V <= Vp);
    padded columns take no part. Returns a (1,) tensor holding the mean loss.
    label_smoothing eps (PyTorch's): (1 - eps) * nll + eps * mean_v(-log p_v).
    z_loss c (PaLM): adds c * logsumexp(logits)^2 per position, included in the loss.
    """
    _check(logits, "logits", None, t)
    Vp = logits.shape[-1]
    V = Vp if vocab_size is None else int(vocab_size)
    if not 0 < V <= Vp:
        raise ValueError(f"cross_entropy: vocab_size {V} must be in [1, {Vp}] (the logits' width)")
    if not (0.0 <= label_smoothing <= 1.0 and z_loss >= 0.0):
        raise ValueError(f"cross_entropy: need 0 <= label_smoothing <= 1 and z_loss >= 0, "
                         f"got {label_smoothing} and {z_loss}")
    opts = (float(label_smoothing), float(z_loss))
    N = logits.size // Vp
    targets = check_ids(targets, "targets", V, len(logits.shape) - 1, ignore_index=True)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets {targets.shape} do not match logits {logits.shape[:-1]}")
    targets = t.keep_ids(targets.reshape(N))
    loss = t.new((1,))
    losses = t.new_saved((N,))
    lse = t.new_saved((N,))
    t.k.softmax_xent_forward(loss.data, losses.data, lse.data, logits.data.reshape(N, Vp), targets.data, V, *opts)
    t.record(_cross_entropy_backward, loss, logits, lse, targets, V, opts)
    return loss


def _cross_entropy_backward(k, loss, logits, lse, targets, V, opts):
    Vp = logits.shape[-1]
    N = logits.size // Vp
    k.softmax_xent_backward(logits.grad.reshape(N, Vp), loss.grad, logits.data.reshape(N, Vp),
                            lse.data, targets.data, V, *opts)


# rows of logits the chunked classifier holds at a time (tape.work scratch): 128 x 49152
# floats is 25 MB, against 192 MiB for SmolLM2's whole B=4 T=256 batch; 128-row gemms still
# run near full speed
XENT_CHUNK_ROWS = 128


def classifier_xent(t: Tape, x: Tensor, weight: Tensor, targets: np.ndarray, vocab_size: Optional[int] = None,
                    label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[Optional[Tensor], Tensor]:
    """The classifier and its loss fused: logits = x @ weight^T (weight (Vp, C), e.g. the
    tied embedding) and their mean cross-entropy as cross_entropy computes it. Returns
    (logits (..., Vp), loss (1,)), or (None, loss) when the logits are never formed (below).

    The logits get no gradient memory: the backward overwrites them with their gradient
    (as llm.c's fused classifier does) and feeds the dX and dW gemms from there, so the
    (N, Vp) gradient array, the largest activation gradient of a small model, never
    exists. The logits are readable until the backward runs; nothing else may
    differentiate them (use linear + cross_entropy when another loss reads the logits too).

    Frozen weight, training mode, recording tape (LoRA and frozen-base fine-tuning): the
    logits are not kept at all and None is returned for them. The forward takes
    XENT_CHUNK_ROWS rows at a time through the tape's scratch: logits, loss, their gradient
    in place, and x's gradient from it (for a unit loss grad, into an (N, C) saved array);
    the backward only scales that by the loss's grad. Evaluation (eval() mode), inference
    and a trainable classifier keep the path above and return the logits.
    """
    _check(x, "x", None, t)
    _check(weight, "weight", 2, t)
    Vp, C = weight.shape
    if x.shape[-1] != C:
        raise ValueError(f"classifier_xent: x has {x.shape[-1]} features, weight {weight.shape} expects {C}")
    V = Vp if vocab_size is None else int(vocab_size)
    if not 0 < V <= Vp:
        raise ValueError(f"classifier_xent: vocab_size {V} must be in [1, {Vp}] (the weight's rows)")
    if not (0.0 <= label_smoothing <= 1.0 and z_loss >= 0.0):
        raise ValueError(f"classifier_xent: need 0 <= label_smoothing <= 1 and z_loss >= 0, "
                         f"got {label_smoothing} and {z_loss}")
    targets = check_ids(targets, "targets", V, x.ndim - 1, ignore_index=True)
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"classifier_xent: targets {targets.shape} do not match x {x.shape[:-1]}")
    opts = (float(label_smoothing), float(z_loss))
    N = x.size // C
    if t.training and t.recording and weight.grad is None:   # .grad makes the grad mirror: ask last
        return None, _classifier_xent_chunked(t, x, weight, targets.reshape(N), V, opts)
    targets = t.keep_ids(targets.reshape(N))
    logits = t.new_saved(x.shape[:-1] + (Vp,))   # saved arena: no grad slot, ever
    loss = t.new((1,))
    losses = t.new_saved((N,))
    lse = t.new_saved((N,))
    t.k.matmul_forward(logits.data.reshape(N, Vp), x.data.reshape(N, C), weight.data, _none(t.k, t.dtype), False)
    t.k.softmax_xent_forward(loss.data, losses.data, lse.data, logits.data.reshape(N, Vp), targets.data, V, *opts)
    t.record(_classifier_xent_backward, loss, x, weight, logits, lse, targets, V, opts)
    return logits, loss


def _classifier_xent_backward(k, loss, x, weight, logits, lse, targets, V, opts):
    Vp, C = weight.shape
    N = x.size // C
    dlogits = logits.data.reshape(N, Vp)
    k.softmax_xent_grad_(dlogits, loss.grad, lse.data, targets.data, V, *opts)
    k.matmul_backward(x.grad.reshape(N, C), _grad(k, weight), _none(k, x.dtype), dlogits,
                      x.data.reshape(N, C), weight.data, False)


def _classifier_xent_chunked(t: Tape, x: Tensor, weight: Tensor, targets: np.ndarray, V: int, opts) -> Tensor:
    """classifier_xent with a frozen weight: the loss, and x's gradient for a unit loss grad
    (dx, saved), computed XENT_CHUNK_ROWS rows at a time; the (N, Vp) logits never exist.
    The gradient is linear in the loss's grad (also with label smoothing and z-loss), so
    the backward is dx scaled by it."""
    k = t.k
    Vp, C = weight.shape
    N = targets.shape[0]
    counted = int(np.count_nonzero(targets >= 0))   # the mean's denominator, over the whole batch
    scale = 1.0 / counted if counted else 0.0
    targets = t.keep_ids(targets)
    loss = t.new((1,))
    losses = t.new_saved((N,))
    dx = t.new_saved((N, C))
    k.fill_(dx.data.reshape(-1), 0.0)
    xs = x.data.reshape(N, C)
    for n0 in range(0, N, XENT_CHUNK_ROWS):
        n1 = min(N, n0 + XENT_CHUNK_ROWS)
        logits = t.work((n1 - n0, Vp))
        k.matmul_forward(logits, xs[n0:n1], weight.data, _none(k, t.dtype), False)
        k.xent_rows_grad_(logits, losses.data[n0:n1], targets.data[n0:n1], V, scale, *opts)
        k.matmul_backward(dx.data[n0:n1], _grad(k, weight), _none(k, t.dtype), logits, xs[n0:n1], weight.data, False)
    k.xent_mean(loss.data, losses.data, targets.data)
    t.record(_classifier_xent_chunked_backward, loss, x, dx)
    return loss


def _classifier_xent_chunked_backward(k, loss, x, dx):
    # x.grad += loss.grad[0] * dx
    k.scale_backward(x.gflat, _none(k, x.dtype), dx.flat, dx.flat, loss.grad)


# ----------------------------------------------------------------------------- log-probabilities

def _vocab(logits: Tensor, vocab_size: Optional[int], op: str) -> int:
    Vp = logits.shape[-1]
    V = Vp if vocab_size is None else int(vocab_size)
    if not 0 < V <= Vp:
        raise ValueError(f"{op}: vocab_size {V} must be in [1, {Vp}] (the logits' width)")
    return V


def token_logprobs(t: Tape, logits: Tensor, targets: np.ndarray, vocab_size: Optional[int] = None) -> Tensor:
    """log p(target) at every position: logits (..., Vp) -> (...), 0 where the target is -1.

    Computed row by row from the logits (log-sum-exp, then one gather): no second
    (..., V) array is made. The backward adds dlp * (onehot - softmax) to the logits' grad."""
    _check(logits, "logits", None, t)
    V = _vocab(logits, vocab_size, "token_logprobs")
    targets = check_ids(targets, "targets", V, len(logits.shape) - 1, ignore_index=True)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_logprobs: targets {targets.shape} do not match logits {logits.shape[:-1]}")
    Vp = logits.shape[-1]
    N = logits.size // Vp
    targets = t.keep_ids(targets.reshape(N))
    lp = t.new(logits.shape[:-1])
    lse = t.new_saved((N,))
    t.k.logprobs_forward(lp.data.reshape(N), lse.data, logits.data.reshape(N, Vp), targets.data, V)
    t.record(_token_logprobs_backward, lp, logits, lse, targets, V)
    return lp


def _token_logprobs_backward(k, lp, logits, lse, targets, V):
    Vp = logits.shape[-1]
    N = logits.size // Vp
    k.logprobs_backward(logits.grad.reshape(N, Vp), lp.grad.reshape(N), logits.data.reshape(N, Vp), lse.data,
                        targets.data, V)


def sum_rows(t: Tape, x: Tensor) -> Tensor:
    """The sum over the last axis: (..., C) -> (...)."""
    _check(x, "x", None, t)
    C = x.shape[-1]
    N = x.size // C
    out = t.new(x.shape[:-1] if x.ndim > 1 else (1,))
    t.k.sum_rows_forward(out.data.reshape(N), x.data.reshape(N, C))
    t.record(_sum_rows_backward, out, x)
    return out


def _sum_rows_backward(k, out, x):
    C = x.shape[-1]
    N = x.size // C
    k.sum_rows_backward(x.grad.reshape(N, C), out.grad.reshape(N))


def sequence_logprobs(t: Tape, logits: Tensor, targets: np.ndarray,
                      vocab_size: Optional[int] = None) -> tuple[Tensor, np.ndarray]:
    """Per row of a (B, T, Vp) batch: (the sum of log p(target) over the positions whose
    target is not -1 (the response mask), as a (B,) tensor with a backward; the count of
    those positions, a (B,) NumPy int array). What DPO compares between policy and reference."""
    if logits.ndim != 3:
        raise ValueError(f"sequence_logprobs: logits must be (B, T, V), got {logits.shape}")
    lp = token_logprobs(t, logits, targets, vocab_size)
    counts = np.count_nonzero(np.asarray(targets) >= 0, axis=1)
    return sum_rows(t, lp), counts


def kl_div(t: Tape, logits: Tensor, teacher: Tensor, temperature: float = 1.0,
           targets: Optional[np.ndarray] = None, vocab_size: Optional[int] = None) -> Tensor:
    """Distillation loss (1,): the mean over positions (those whose target is not -1 when
    `targets` is given) of T^2 * KL(softmax(teacher / T) || softmax(logits / T)) over the
    first vocab_size columns (Hinton et al.'s T^2 keeps the gradient's size independent of T).

    `teacher` is the teacher model's logits tensor (its own tape, run without recording);
    it is copied into this tape, so the teacher may run again before this backward. The
    teacher gets no gradient; the student's is T * (softmax(logits/T) - softmax(teacher/T))."""
    _check(logits, "logits", None, t)
    if not isinstance(teacher, Tensor) or teacher.dtype != logits.dtype:
        raise TypeError(f"kl_div: teacher must be an nt Tensor of dtype {logits.dtype}")
    if teacher.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"kl_div: teacher logits {teacher.shape} and student logits {logits.shape} "
                         "must cover the same positions")
    if not (isinstance(temperature, (int, float, np.floating)) and 0 < temperature < np.inf):
        raise ValueError(f"kl_div: temperature must be a positive number, got {temperature!r}")
    V = _vocab(logits, vocab_size, "kl_div")
    if V > teacher.shape[-1]:
        raise ValueError(f"kl_div: the teacher's logits have {teacher.shape[-1]} columns, fewer than vocab_size {V}")
    Vp, Vt = logits.shape[-1], teacher.shape[-1]
    N = logits.size // Vp
    if targets is None:
        targets = np.zeros(logits.shape[:-1], dtype=np.int32)   # every position counts
    targets = check_ids(targets, "targets", V, len(logits.shape) - 1, ignore_index=True)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"kl_div: targets {targets.shape} do not match logits {logits.shape[:-1]}")
    targets = t.keep_ids(targets.reshape(N))
    kept = t.new_saved((N, Vt))
    t.k.copy_(kept.data, teacher.data.reshape(N, Vt))
    loss = t.new((1,))
    rows = t.new_saved((N,))
    lse = t.new_saved((N, 2))
    T = float(temperature)
    t.k.kl_div_forward(loss.data, rows.data, lse.data, logits.data.reshape(N, Vp), kept.data, targets.data, V, T)
    t.record(_kl_div_backward, loss, logits, kept, lse, targets, V, T)
    return loss


def _kl_div_backward(k, loss, logits, teacher, lse, targets, V, T):
    Vp = logits.shape[-1]
    N = logits.size // Vp
    k.kl_div_backward(logits.grad.reshape(N, Vp), loss.grad, logits.data.reshape(N, Vp), teacher.data, lse.data,
                      targets.data, V, T)


# ----------------------------------------------------------------------------- alignment losses

__all__ += ["dpo", "grpo"]

DPO_LOSS_TYPES = {"sigmoid": 0, "ipo": 1}   # the kernels' loss kinds (nt.kernels.cpu.align)


def _host_array(t: Tape, values, shape: tuple, name: str, op: str) -> Tensor:
    """A finite float NumPy input (reference log-probs, advantages, a mask) validated and
    copied into the tape's saved arena, so the backward reads the tape's copy."""
    a = np.asarray(values)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{op}: {name} must hold numbers, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{op}: {name} holds a non-finite value at index {bad}")
    kept = t.new_saved(shape)
    t.k.copy_(kept.data, np.ascontiguousarray(a, dtype=t.dtype))
    return kept


def dpo(t: Tape, policy_logps: Tensor, ref_logps: np.ndarray, beta: float = 0.1, label_smoothing: float = 0.0,
        loss_type: str = "sigmoid", lengths: Optional[np.ndarray] = None) -> Tensor:
    """The DPO loss (1,): the mean over B pairs of
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing)
    ipo:     (h - 1 / (2 beta))^2
    with h = (pi_c - ref_c) - (pi_r - ref_r). policy_logps (2B,) is a tensor (the chosen
    rows first, then the rejected ones, as sequence_logprobs gives them for such a batch);
    ref_logps (2B,) a NumPy array (no gradient). `lengths` (2B,), when given, divides each
    log-probability by its response length first: IPO's averaged log-probs, as TRL computes
    them. The gradient flows to policy_logps only."""
    _check(policy_logps, "policy_logps", 1, t)
    N = policy_logps.shape[0]
    if N == 0 or N % 2:
        raise ValueError(f"dpo: policy_logps must hold 2B values (B chosen, then B rejected), got {N}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo: loss_type must be one of {sorted(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if not (isinstance(beta, (int, float, np.floating)) and 0 < beta < np.inf):
        raise ValueError(f"dpo: beta must be a positive number, got {beta!r}")
    if not (isinstance(label_smoothing, (int, float, np.floating)) and 0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"dpo: label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    ref = _host_array(t, ref_logps, (N,), "ref_logps", "dpo")
    if lengths is None:
        weight = np.ones(N)
    else:
        lengths = np.asarray(lengths)
        if lengths.shape != (N,) or lengths.dtype.kind not in "iuf" or not np.all(lengths > 0):
            raise ValueError(f"dpo: lengths must be ({N},) positive numbers, got {lengths!r}")
        weight = 1.0 / lengths
    weight = _host_array(t, weight, (N,), "weight", "dpo")
    args = (float(beta), float(label_smoothing), DPO_LOSS_TYPES[loss_type])
    loss = t.new((1,))
    losses = t.new_saved((N // 2,))
    t.k.dpo_forward(loss.data, losses.data, policy_logps.data, ref.data, weight.data, *args)
    t.record(_dpo_backward, loss, policy_logps, ref, weight, args)
    return loss


def _dpo_backward(k, loss, policy, ref, weight, args):
    k.dpo_backward(policy.grad, loss.grad, policy.data, ref.data, weight.data, *args)


def grpo(t: Tape, logps: Tensor, old_logps: np.ndarray, ref_logps: Optional[np.ndarray], advantages: np.ndarray,
         mask: np.ndarray, beta: float = 0.04, epsilon: float = 0.2, epsilon_high: Optional[float] = None) -> Tensor:
    """The GRPO loss (1,) on per-token log-probabilities logps (B, T) (a tensor, e.g. from
    token_logprobs): per completion token, with r = exp(logps - old_logps),
        l = -(min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) - beta (exp(ref - logps) - (ref - logps) - 1))
    (A the completion's advantage, (B,); the KL term is the k3 estimator of KL(pi || ref)),
    summed over the tokens where mask (B, T) is nonzero and divided by their count:
    token-level averaging over the batch. old_logps and ref_logps (B, T) are NumPy arrays
    (no gradient); ref_logps may be None when beta is 0. epsilon_high defaults to epsilon."""
    _check(logps, "logps", 2, t)
    shape = logps.shape
    B = shape[0]
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if not (isinstance(beta, (int, float, np.floating)) and 0 <= beta < np.inf):
        raise ValueError(f"grpo: beta must be a number >= 0, got {beta!r}")
    if not (isinstance(epsilon, (int, float, np.floating)) and 0 < epsilon < 1):
        raise ValueError(f"grpo: epsilon must be in (0, 1), got {epsilon!r}")
    if not (isinstance(epsilon_high, (int, float, np.floating)) and 0 < epsilon_high < np.inf):
        raise ValueError(f"grpo: epsilon_high must be a positive number, got {epsilon_high!r}")
    if ref_logps is None:
        if beta != 0:
            raise ValueError("grpo: ref_logps are needed for the KL penalty (beta > 0)")
        ref_logps = np.zeros(shape)   # beta 0: the KL term is multiplied away
    old = _host_array(t, old_logps, shape, "old_logps", "grpo")
    ref = _host_array(t, ref_logps, shape, "ref_logps", "grpo")
    adv = _host_array(t, advantages, (B,), "advantages", "grpo")
    kept_mask = _host_array(t, mask, shape, "mask", "grpo")
    args = (float(beta), float(epsilon), float(epsilon_high))
    loss = t.new((1,))
    rows = t.new_saved((B,))
    t.k.grpo_forward(loss.data, rows.data, logps.data, old.data, ref.data, adv.data, kept_mask.data, *args)
    t.record(_grpo_backward, loss, logps, old, ref, adv, kept_mask, args)
    return loss


def _grpo_backward(k, loss, logps, old, ref, adv, mask, args):
    k.grpo_backward(logps.grad, loss.grad, logps.data, old.data, ref.data, adv.data, mask.data, *args)


# ----------------------------------------------------------------------------- vision

def unfold_patches(t: Tape, x: Tensor, patch: int) -> Tensor:
    """The non-overlapping patch x patch patches of images x (N, Ch, H, W) as rows:
    (N, P, Ch * patch * patch), P = (H / patch) * (W / patch) in row-major order, each patch
    flattened channel-major (c, ky, kx) as a Conv2d weight (OC, Ch, p, p) is."""
    _check(x, "x", 4, t)
    p = int(patch)
    N, Ch, H, W = x.shape
    if p <= 0 or H % p or W % p or min(N, Ch, H, W) == 0:
        raise ValueError(f"unfold_patches: images {x.shape} must be non-empty with H and W multiples of "
                         f"the patch size {patch}")
    out = t.new((N, (H // p) * (W // p), Ch * p * p))
    t.k.unfold_forward(out.data, x.data, p)
    t.record(_unfold_patches_backward, out, x, p)
    return out


def _unfold_patches_backward(k, out, x, p):
    k.unfold_backward(x.grad, out.grad, p)


def patch_embed(t: Tape, x: Tensor, weight: Tensor, bias: Optional[Tensor], patch: int) -> Tensor:
    """A vision transformer's patch embedding: images x (N, Ch, H, W) -> (N, P, C), each
    patch flattened (unfold_patches) and projected by weight (C, Ch * patch * patch), which
    is a PyTorch Conv2d(Ch, C, patch, stride=patch) weight reshaped; one gemm for all patches."""
    return linear(t, unfold_patches(t, x, patch), weight, bias)


def cls_tokens(t: Tape, x: Tensor, cls: Tensor, pos: Tensor) -> Tensor:
    """[cls; x] + pos: the CLS token prepended to every sequence of x (N, P, C) and learned
    positions pos (1 + P, C) added, one pass: (N, 1 + P, C)."""
    _check(x, "x", 3, t)
    _check(cls, "cls", 1, t)
    _check(pos, "pos", 2, t)
    N, P, C = x.shape
    if cls.shape != (C,) or pos.shape != (P + 1, C):
        raise ValueError(f"cls_tokens: x {x.shape} needs cls ({C},) and pos ({P + 1}, {C}), "
                         f"got {cls.shape} and {pos.shape}")
    out = t.new((N, P + 1, C))
    t.k.cls_pos_forward(out.data, x.data, cls.data, pos.data)
    t.record(_cls_tokens_backward, out, x, cls, pos)
    return out


def _cls_tokens_backward(k, out, x, cls, pos):
    k.cls_pos_backward(x.grad, _grad(k, cls), _grad(k, pos), out.grad)


def _pool(t: Tape, x: Tensor, mean: bool, op: str) -> Tensor:
    _check(x, "x", 3, t)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x {x.shape} has no tokens to pool")
    out = t.new((x.shape[0], x.shape[2]))
    t.k.pool_forward(out.data, x.data, mean)
    t.record(_pool_backward, out, x, mean)
    return out


def _pool_backward(k, out, x, mean):
    k.pool_backward(x.grad, out.grad, mean)


def mean_pool(t: Tape, x: Tensor) -> Tensor:
    """The mean over the tokens of x (N, T, C): (N, C)."""
    return _pool(t, x, True, "mean_pool")


def cls_pool(t: Tape, x: Tensor) -> Tensor:
    """The first (CLS) token of each sequence of x (N, T, C): (N, C)."""
    return _pool(t, x, False, "cls_pool")


__all__ += ["unfold_patches", "patch_embed", "cls_tokens", "mean_pool", "cls_pool"]
