"""nt's GPT2 and Llama to and from GGUF files: llama.cpp's tensor names and metadata keys
for the "gpt2" architecture and the Llama family's "llama", "qwen2", "qwen3" and "gemma3"
(one LLAMA_ARCHS entry each), and the tokenizer that tokenizer.ggml.* describes (read:
tokenizer_from_metadata; written: tokenizer_metadata).

nt.io.gguf reads and writes the format; this module decides what a file must hold to be
one of nt's models. `load` checks everything before it builds anything: every metadata key
it uses must be of the right GGUF type with a sane value, and the tensor directory must
hold exactly the tensors (names and shapes) those keys imply. So a file that claims a
million layers must list millions of tensors, which its size already bounds: no number
from the file sizes a model the file could not fill. Every problem is a FormatError naming
the file, the key or tensor, and the byte offset of its entry.

Shapes are NumPy's (ggml's ne reversed), as nt.io.gguf speaks them.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from .. import bitnet, ops
from ..io.common import FormatError, require_finite
from ..io.gguf import DEQUANTIZE_TYPES, FILE_TYPES, GGML_TYPE_IDS, GGML_TYPES, WRITE_TYPES, GGUFFile, write_gguf
from ..tokenizer import (ENDOFTEXT, BPE, SP_BYTE, SP_CONTROL, SP_NORMAL, SP_UNUSED, SP_USER_DEFINED, SentencePieceBPE,
                         bytes_to_unicode)
from .base import LanguageModel
from .gpt2 import GPT2, GPT2Config, param_layout as gpt2_param_layout
from .llama import Llama, LlamaConfig, param_layout as llama_param_layout

# a context_length past this is a corrupt field, not a model (nt's Llama keeps no table
# of that length, so the directory cannot bound it as it bounds GPT-2's)
MAX_CONTEXT = 2 ** 31

# ====================================================================== metadata, checked

_INTS = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")
# the GGUF value types nt accepts for each kind of value it reads (bool is not an int here)
_KINDS = {
    "int": _INTS, "float": _INTS + ("float32", "float64"), "bool": ("bool",), "string": ("string",),
    "strings": ("array[string]",), "ints": tuple(f"array[{t}]" for t in _INTS),
    "floats": ("array[float32]", "array[float64]"),
}


def _bad(f: GGUFFile, key: str, problem: str) -> FormatError:
    """A FormatError about metadata `key` of `f`, at the byte offset of its entry."""
    return FormatError(f"{f.path}: metadata {key!r} (entry at byte {f.metadata_offsets[key]}): {problem}")


def _get(f: GGUFFile, key: str, kind: str, default: Any = None) -> Any:
    """Metadata `key` if it is stored as `kind` (one of _KINDS), `default` when absent."""
    if key not in f.metadata:
        return default
    if f.value_types[key] not in _KINDS[kind]:
        raise _bad(f, key, f"must be {kind}, got {f.value_types[key]} {f.metadata[key]!r:.60}")
    return f.metadata[key]


def _need(f: GGUFFile, key: str, kind: str) -> Any:
    """Metadata `key` stored as `kind`; its absence is an error."""
    if key not in f.metadata:
        raise FormatError(f"{f.path}: missing metadata {key!r}")
    return _get(f, key, kind)


def _size(f: GGUFFile, key: str, default: Optional[int] = None) -> int:
    """A positive integer (a count or a width); required when there is no default."""
    v = _need(f, key, "int") if default is None else _get(f, key, "int", default)
    if v <= 0:
        raise _bad(f, key, f"must be positive, got {v}")
    return v


def _positive(f: GGUFFile, key: str, default: Optional[float] = None) -> float:
    """A finite positive number (an epsilon, a RoPE base); required when there is no default."""
    v = float(_need(f, key, "float") if default is None else _get(f, key, "float", default))
    if not (math.isfinite(v) and v > 0):
        raise _bad(f, key, f"must be a finite positive number, got {v}")
    return v


def _array(f: GGUFFile, key: str, kind: str, n: int) -> Optional[Any]:
    """An array metadata value of `kind` ("strings", "ints", "floats") holding n entries, or None."""
    v = _get(f, key, kind)
    if v is not None and len(v) != n:
        raise _bad(f, key, f"has {len(v)} entries for {n} tokens")
    return v


# ====================================================================== tensor directory, checked

def _rows(f: GGUFFile, name: str) -> int:
    """The row count of 2-D tensor `name` (the vocabulary of token_embd.weight)."""
    if name not in f:
        raise FormatError(f"{f.path}: missing tensor {name!r}")
    shape = f.tensor_infos[name].shape
    if len(shape) != 2 or shape[0] == 0:
        raise FormatError(f"{f.path}: tensor {name!r} (data at byte {f.tensor_infos[name].offset}) "
                          f"has shape {shape}, expected (vocabulary, width)")
    return shape[0]


def _check_layer_count(f: GGUFFile, key: str, n_layers: int, per_layer: int) -> None:
    """Refuse a block_count the directory cannot hold, before listing that many names."""
    if n_layers * per_layer > len(f.tensor_infos):
        raise _bad(f, key, f"{n_layers} layers need {n_layers * per_layer} tensors, "
                           f"the file lists {len(f.tensor_infos)}")


def _check_directory(f: GGUFFile, arch: str, expected: dict[str, tuple], optional: tuple = ()) -> None:
    """Every expected tensor is present with its shape and a type nt dequantises (those named
    in `optional` may be absent instead); no other tensor is present."""
    for name, shape in expected.items():
        if name not in f:
            if name in optional:
                continue
            raise FormatError(f"{f.path}: missing tensor {name!r} (a {arch} model of these metadata has it)")
        info = f.tensor_infos[name]
        if info.shape != shape:
            raise FormatError(f"{f.path}: tensor {name!r} (data at byte {info.offset}) has shape {info.shape}, "
                              f"the metadata make it {shape}")
        if info.type not in DEQUANTIZE_TYPES:
            raise FormatError(f"{f.path}: tensor {name!r} (data at byte {info.offset}) has type {info.type}, "
                              f"which nt cannot dequantise (supported: {', '.join(DEQUANTIZE_TYPES)})")
    for name in f:
        if name not in expected:
            raise FormatError(f"{f.path}: tensor {name!r} (data at byte {f.tensor_infos[name].offset}) "
                              f"is not part of nt's {arch} model")


# ====================================================================== parameters

def _param_views(model: LanguageModel, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Every parameter of `model` as a view of `flat`, a host array of all of them in
    canonical order (params.offsets; frozen parameters included)."""
    params = model.params
    return {name: flat[params.offsets[name]:params.offsets[name] + t.size].reshape(t.shape)
            for name, t in params.items()}


# ====================================================================== GPT-2

# nt GPT2 parameter -> llama.cpp tensor name ({l} = layer). Shapes agree per layer: nt keeps
# linear weights (out, in) = NumPy order of ne = [in, out], llama.cpp's convention for GPT-2.
GPT2_TENSOR_NAMES = [
    ("wte", "token_embd.weight"), ("wpe", "position_embd.weight"),
    ("ln1w", "blk.{l}.attn_norm.weight"), ("ln1b", "blk.{l}.attn_norm.bias"),
    ("qkvw", "blk.{l}.attn_qkv.weight"), ("qkvb", "blk.{l}.attn_qkv.bias"),
    ("attprojw", "blk.{l}.attn_output.weight"), ("attprojb", "blk.{l}.attn_output.bias"),
    ("ln2w", "blk.{l}.ffn_norm.weight"), ("ln2b", "blk.{l}.ffn_norm.bias"),
    ("fcw", "blk.{l}.ffn_up.weight"), ("fcb", "blk.{l}.ffn_up.bias"),
    ("fcprojw", "blk.{l}.ffn_down.weight"), ("fcprojb", "blk.{l}.ffn_down.bias"),
    ("lnfw", "output_norm.weight"), ("lnfb", "output_norm.bias"),
]
GPT2_EPS = 1e-5   # nt's GPT-2 layernorm epsilon, as llm.c's


def _gpt2_shapes(cfg: GPT2Config) -> dict[str, tuple]:
    """llama.cpp tensor name -> NumPy shape for a GPT-2 of `cfg`: nt's parameter shapes, per
    layer, with the real (unpadded) vocabulary; output.weight is the tied embedding's copy."""
    layout = {name: shape for name, shape, _ in gpt2_param_layout(cfg)}
    shapes = {}
    for nt_name, gguf_name in GPT2_TENSOR_NAMES:
        if "{l}" in gguf_name:
            shapes.update({gguf_name.format(l=l): layout[nt_name][1:] for l in range(cfg.n_layer)})
        else:
            shapes[gguf_name] = layout[nt_name]
    shapes["token_embd.weight"] = shapes["output.weight"] = (cfg.vocab_size, cfg.n_embd)
    return shapes


def _gpt2_config(f: GGUFFile) -> GPT2Config:
    """The GPT2Config a "gpt2" file describes, its metadata and whole directory checked.
    `output.weight` may be present: nt's GPT-2 ties the classifier to token_embd, so it is
    ignored (llama.cpp's converter writes the tied matrix out)."""
    C, NH = _size(f, "gpt2.embedding_length"), _size(f, "gpt2.attention.head_count")
    L, T = _size(f, "gpt2.block_count"), _size(f, "gpt2.context_length")
    if C % NH:
        raise _bad(f, "gpt2.attention.head_count", f"{NH} heads do not divide the width {C} (gpt2.embedding_length)")
    if _size(f, "gpt2.feed_forward_length", 4 * C) != 4 * C:
        raise _bad(f, "gpt2.feed_forward_length", f"nt's GPT-2 has a 4*C = {4 * C} MLP, "
                                                  f"the file says {f.metadata['gpt2.feed_forward_length']}")
    eps = _positive(f, "gpt2.attention.layer_norm_epsilon", GPT2_EPS)
    if abs(eps - GPT2_EPS) > 1e-9:   # float32 rounding of 1e-5 is far below this
        raise _bad(f, "gpt2.attention.layer_norm_epsilon", f"nt's GPT-2 uses {GPT2_EPS}, the file says {eps}")
    V = _rows(f, "token_embd.weight")
    if _size(f, "gpt2.vocab_size", V) != V:
        raise _bad(f, "gpt2.vocab_size", f"{f.metadata['gpt2.vocab_size']} but token_embd.weight has {V} rows")
    _check_layer_count(f, "gpt2.block_count", L, 12)   # 6 weights and 6 biases a layer
    # T is checked here too: nt's GPT-2 allocates a (T, C) position table, which the file
    # must hold as position_embd.weight
    cfg = GPT2Config(block_size=T, vocab_size=V, n_layer=L, n_head=NH, n_embd=C)
    _check_directory(f, "gpt2", _gpt2_shapes(cfg), optional=("output.weight",))
    return cfg


def _gpt2_import(f: GGUFFile, cfg: GPT2Config, device: str) -> GPT2:
    model = GPT2(cfg, device=device, seed=None)
    host = np.zeros(model.params.numel, dtype=np.float32)
    p = _param_views(model, host)
    for nt_name, gguf_name in GPT2_TENSOR_NAMES:
        view = p[nt_name]
        if nt_name == "wte":
            _dequantized(f, gguf_name, view[:cfg.vocab_size])
        elif "{l}" in gguf_name:
            for l in range(cfg.n_layer):
                _dequantized(f, gguf_name.format(l=l), view[l])
        else:
            _dequantized(f, gguf_name, view)
    model.load_flat(host)
    return model


def _gpt2_export(model: GPT2) -> tuple[dict, dict]:
    cfg = model.config
    meta = {
        "general.architecture": "gpt2", "general.name": "nt-gpt2",
        "gpt2.context_length": cfg.block_size, "gpt2.embedding_length": cfg.n_embd,
        "gpt2.feed_forward_length": 4 * cfg.n_embd, "gpt2.block_count": cfg.n_layer,
        "gpt2.attention.head_count": cfg.n_head, "gpt2.attention.layer_norm_epsilon": GPT2_EPS,
        "gpt2.vocab_size": cfg.vocab_size,
    }
    values = _param_views(model, model.params.to_flat().astype(np.float32, copy=False))
    values["wte"] = values["wte"][:cfg.vocab_size]   # drop nt's vocabulary padding
    per_layer = [(n, g) for n, g in GPT2_TENSOR_NAMES if "{l}" in g]
    arrays = {g: values[n] for n, g in GPT2_TENSOR_NAMES if "{l}" not in g and not g.startswith("output")}
    for l in range(cfg.n_layer):   # llama.cpp's order: layer by layer
        arrays.update({g.format(l=l): values[n][l] for n, g in per_layer})
    arrays.update({g: values[n] for n, g in GPT2_TENSOR_NAMES if g.startswith("output")})
    # the classifier is tied to the embedding; llama.cpp's converter writes it out as well
    arrays["output.weight"] = arrays["token_embd.weight"]
    return meta, arrays


# ====================================================================== the Llama family

class LlamaArch(NamedTuple):
    """How one llama.cpp architecture maps onto nt's Llama."""

    rope_pairing: str   # llama.cpp's rotation: "interleaved" (LLAMA_ROPE_TYPE_NORM) or "half" (NEOX)
    options: dict       # the LlamaConfig options its graph fixes


# One entry per llama.cpp architecture nt reads and writes. Options not named here are nt's
# defaults for all of them (_LLAMA_COMMON). Gemma-3's sliding window, its local/global layer
# pattern and its local RoPE base come from the file (_gemma3_options).
LLAMA_ARCHS = {
    "llama": LlamaArch("interleaved", dict(ffn_kind="swiglu", qkv_bias=False, qk_norm=False, post_norms=False,
                                           embed_scale=False, sliding_window=0)),
    # Qwen2: biases on q, k, v (not on the output projection)
    "qwen2": LlamaArch("half", dict(ffn_kind="swiglu", qkv_bias=True, qk_norm=False, post_norms=False,
                                    embed_scale=False, sliding_window=0)),
    # Qwen3: RMSNorm of each q/k head before RoPE, no biases
    "qwen3": LlamaArch("half", dict(ffn_kind="swiglu", qkv_bias=False, qk_norm=True, post_norms=False,
                                    embed_scale=False, sliding_window=0)),
    # Gemma-3: GeGLU, RMSNorm of each q/k head, norms after attention and MLP, embeddings
    # times sqrt(dim) (applied by llama.cpp's graph, not stored)
    "gemma3": LlamaArch("half", dict(ffn_kind="geglu", qkv_bias=False, qk_norm=True, post_norms=True,
                                     embed_scale=True)),
    # BitNet b1.58 (llama.cpp's LLM_ARCH_BITNET): ternary TQ2_0 projections, an RMSNorm before
    # the attention output and the down projection (attn_sub_norm, ffn_sub_norm)
    "bitnet": LlamaArch("half", dict(ffn_kind="swiglu", qkv_bias=False, qk_norm=False, post_norms=False,
                                     embed_scale=False, sliding_window=0, bitnet=True)),
}
_LLAMA_COMMON = dict(norm="rmsnorm", rope_scaling=None, n_predict=1, bitnet=False)

# llama.cpp's gemma3 (llama_load_hparams_gemma3): five local layers then a global one, local
# layers with RoPE base 10000. Versions that read attention.sliding_window_pattern and
# rope.freq_base_swa take them from the file; older ones always use these.
GEMMA3_PATTERN = 6
GEMMA3_LOCAL_THETA = 10000.0
# llama.cpp takes an n_layer = 62 Gemma-3 for the 27B model and scales its attention by
# 1/sqrt(embedding_length / head_count) instead of 1/sqrt(head size), which nt does not
GEMMA3_27B_LAYERS = 62

# nt matrices that from_gguf(keep_quantized=True) may keep as blocks
_KEPT_MATRICES = ("qkvw", "attn_out", "gate_up", "down")


def _layer_tensors(cfg: LlamaConfig) -> list[tuple[str, str, int, int]]:
    """One block's GGUF tensors in llama.cpp's order, as (nt parameter, name after "blk.N.",
    first row, end row): the tensor is rows [first, end) of the parameter's layer slice
    (q, k and v are stacked in qkvw and qkvb, gate and up in gate_up)."""
    C, H, hs = cfg.dim, cfg.ffn_hidden, cfg.hs
    q, kv = cfg.n_heads * hs, cfg.n_kv_heads * hs
    qkv = (("attn_q", 0, q), ("attn_k", q, q + kv), ("attn_v", q + kv, q + 2 * kv))
    out = [("attn_norm", "attn_norm.weight", 0, C)]
    out += [("qkvw", f"{g}.weight", a, b) for g, a, b in qkv]
    if cfg.qkv_bias:
        out += [("qkvb", f"{g}.bias", a, b) for g, a, b in qkv]
    if cfg.qk_norm:
        out += [("q_norm", "attn_q_norm.weight", 0, hs), ("k_norm", "attn_k_norm.weight", 0, hs)]
    if cfg.bitnet:
        out.append(("attn_sub_norm", "attn_sub_norm.weight", 0, cfg.n_heads * hs))
    out.append(("attn_out", "attn_output.weight", 0, C))
    if cfg.post_norms:
        out.append(("post_attn_norm", "post_attention_norm.weight", 0, C))
    out += [("ffn_norm", "ffn_norm.weight", 0, C), ("gate_up", "ffn_gate.weight", 0, H),
            ("gate_up", "ffn_up.weight", H, 2 * H)]
    if cfg.bitnet:
        out.append(("ffn_sub_norm", "ffn_sub_norm.weight", 0, H))
    out.append(("down", "ffn_down.weight", 0, C))
    if cfg.post_norms:
        out.append(("post_ffn_norm", "post_ffw_norm.weight", 0, C))
    return out


def _llama_shapes(cfg: LlamaConfig) -> dict[str, tuple]:
    """llama.cpp tensor name -> NumPy shape for a Llama of `cfg`."""
    layer_shape = {name: shape[1:] for name, shape, _ in llama_param_layout(cfg)}
    V, C = cfg.vocab_size, cfg.dim
    per_layer = {g: (b - a,) + layer_shape[n][1:] for n, g, a, b in _layer_tensors(cfg)}
    shapes = {"token_embd.weight": (V, C)}
    for l in range(cfg.n_layers):
        shapes.update({f"blk.{l}.{g}": shape for g, shape in per_layer.items()})
    shapes["output_norm.weight"] = (C,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, C)
    return shapes


def _swa_period(f: GGUFFile, key: str, n_layers: int) -> int:
    """LlamaConfig.global_every from a sliding_window_pattern: llama.cpp's period n (layer l
    is local unless l % n == n - 1; 0: every layer local), which is nt's global_every, or
    one bool per layer (true: local), which must be such a period. Absent: 6."""
    if key not in f.metadata:
        return GEMMA3_PATTERN
    if f.value_types[key] == "array[bool]":
        local = [bool(v) for v in f.metadata[key]]
        if len(local) != n_layers:
            raise _bad(f, key, f"has {len(local)} entries for {n_layers} layers")
        every = local.index(False) + 1 if False in local else 0
        if local != [every == 0 or (l + 1) % every != 0 for l in range(n_layers)]:
            raise _bad(f, key, "nt's Llama has one global layer every n layers; this pattern is not periodic")
        return every
    every = _get(f, key, "int")
    if every < 0:
        raise _bad(f, key, f"must be >= 0, got {every}")
    return every


def _gemma3_options(f: GGUFFile, n_layers: int) -> dict:
    """Sliding window, local/global pattern and local RoPE base of a "gemma3" file, as
    llama.cpp reads them: no (or a zero) window means every layer is global."""
    window = _get(f, "gemma3.attention.sliding_window", "int", 0)
    if not 0 <= window <= MAX_CONTEXT:
        raise _bad(f, "gemma3.attention.sliding_window", f"must be in [0, {MAX_CONTEXT}], got {window}")
    if _get(f, "gemma3.final_logit_softcapping", "float", 0.0) != 0.0:   # NaN included
        raise _bad(f, "gemma3.final_logit_softcapping", "logit soft-capping is not supported by nt's Llama")
    if window == 0:
        return dict(sliding_window=0)
    return dict(sliding_window=window, global_every=_swa_period(f, "gemma3.attention.sliding_window_pattern", n_layers),
                rope_local_theta=_positive(f, "gemma3.rope.freq_base_swa", GEMMA3_LOCAL_THETA))


def _llama_config(f: GGUFFile, arch: str) -> LlamaConfig:
    """The LlamaConfig a file of llama.cpp architecture `arch` (LLAMA_ARCHS) describes, in
    that architecture's RoPE pairing, its metadata and whole directory checked. No
    `output.weight` means a tied classifier."""
    spec = LLAMA_ARCHS[arch]
    unsupported = "RoPE scaling is not supported by nt's Llama"
    if "rope_freqs.weight" in f:
        raise FormatError(f"{f.path}: tensor 'rope_freqs.weight': {unsupported}")
    if _get(f, f"{arch}.rope.scaling.type", "string", "none") not in ("none", "linear"):
        raise _bad(f, f"{arch}.rope.scaling.type", unsupported)
    if _get(f, f"{arch}.rope.scaling.factor", "float", 1.0) != 1.0:   # NaN included
        raise _bad(f, f"{arch}.rope.scaling.factor", unsupported)
    C, L = _size(f, f"{arch}.embedding_length"), _size(f, f"{arch}.block_count")
    NH = _size(f, f"{arch}.attention.head_count")
    NKV = _size(f, f"{arch}.attention.head_count_kv", NH)
    H, T = _size(f, f"{arch}.feed_forward_length"), _size(f, f"{arch}.context_length")
    if T > MAX_CONTEXT:
        raise _bad(f, f"{arch}.context_length", f"{T} positions is past nt's limit of {MAX_CONTEXT}")
    if NH % NKV:
        raise _bad(f, f"{arch}.attention.head_count_kv", f"{NKV} key/value heads do not divide the {NH} query heads")
    if f"{arch}.attention.key_length" in f.metadata:
        hs = _size(f, f"{arch}.attention.key_length")
    elif C % NH:
        raise _bad(f, f"{arch}.attention.head_count", f"{NH} heads do not divide the width {C} "
                                                      f"({arch}.embedding_length) and no {arch}.attention.key_length is given")
    else:
        hs = C // NH
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.value_length"):
        if _size(f, key, hs) != hs:
            raise _bad(f, key, f"partial RoPE or distinct key/value head sizes are not supported (head size {hs})")
    if arch == "gemma3" and L == GEMMA3_27B_LAYERS and C / NH != hs:
        raise _bad(f, "gemma3.block_count", f"llama.cpp scales a {L}-layer Gemma-3's attention by "
                                            f"1/sqrt({C}/{NH}), nt's Llama by 1/sqrt(head size {hs})")
    eps = _positive(f, f"{arch}.attention.layer_norm_rms_epsilon")
    theta = _positive(f, f"{arch}.rope.freq_base", 10000.0)
    V = _rows(f, "token_embd.weight")
    if _size(f, f"{arch}.vocab_size", V) != V:
        raise _bad(f, f"{arch}.vocab_size", f"{f.metadata[f'{arch}.vocab_size']} but token_embd.weight has {V} rows")
    options = dict(spec.options, **(_gemma3_options(f, L) if arch == "gemma3" else {}))
    try:
        cfg = LlamaConfig(dim=C, n_layers=L, n_heads=NH, n_kv_heads=NKV, ffn_hidden=H, vocab_size=V, block_size=T,
                          head_dim=0 if hs * NH == C else hs, norm_eps=eps, rope_theta=theta,
                          rope_pairing=spec.rope_pairing, tie_embeddings="output.weight" not in f, **options)
    except ValueError as e:
        raise FormatError(f"{f.path}: metadata describe an impossible Llama: {e}") from None
    _check_layer_count(f, f"{arch}.block_count", L, len(_layer_tensors(cfg)))
    _check_directory(f, arch, _llama_shapes(cfg))
    return cfg


def _kept_quantized(f: GGUFFile, cfg: LlamaConfig) -> dict[str, str]:
    """{nt matrix: ggml type} for the matrices whose every GGUF tensor is one type that
    ops.linear_q reads (Q8_0, Q4_0, Q4_K, Q6_K); the others are dequantised. None with q/k/v biases
    (Qwen2): nt's Llama keeps no quantised matrix beside a bias. A BitNet file's projections
    must all be TQ2_0 and are always kept, as T2 rows (nt.bitnet.linear_t2 runs them)."""
    if cfg.qkv_bias:
        return {}
    if cfg.bitnet:
        for name in (f"blk.{l}.{g}" for l in range(cfg.n_layers) for m, g, _, _ in _layer_tensors(cfg)
                     if m in _KEPT_MATRICES):
            if f.tensor_infos[name].type not in bitnet.GGUF_TYPES:
                raise FormatError(f"{f.path}: tensor {name!r} is {f.tensor_infos[name].type}; a bitnet file's "
                                  "projections must be TQ2_0 or TQ1_0 (ternary codes and their scales)")
        return {n: "T2" for n in _KEPT_MATRICES}
    groups = {n: [f"blk.{l}.{g}" for l in range(cfg.n_layers) for m, g, _, _ in _layer_tensors(cfg) if m == n]
              for n in _KEPT_MATRICES}
    if not cfg.tie_embeddings:
        groups["lm_head"] = ["output.weight"]
    out = {}
    for n, names in groups.items():
        types = {f.tensor_infos[m].type for m in names}
        if len(types) == 1 and next(iter(types)) in ops.QUANT_FORMATS:
            out[n] = next(iter(types))
    return out


def _decode_only(f: GGUFFile, cfg: LlamaConfig, quantized: dict[str, str]) -> dict[str, list[list[str]]]:
    """{nt matrix: per layer, its GGUF tensors} for the matrices left float (the tape path
    needs one type per matrix) whose tensors all have integer dot kernels, the parts of each
    layer sharing one activation format (Q8_0 / Q4_0 / Q5_0: 32 values, Q4_K / Q6_K: 256): a
    Q4_K_M file's qkv (Q4_K q, k; Q6_K v in some layers) and down (Q4_K or Q6_K by layer), and
    where rows are no multiple of 256 (SmolLM2's 576) the Q5_0 matrices llama.cpp writes in
    place of Q4_K (ops.linear_q has no Q5_0: the tape path reads their float copy). The fused
    decoder runs them on their own blocks (Llama.decode_blocks), as llama.cpp does."""
    from ..kernels.cpu.quant import QDOT_BLOCK, QDOT_CODES
    if cfg.qkv_bias or cfg.bitnet:
        return {}
    out = {}
    for n in set(_KEPT_MATRICES) - set(quantized):
        layers = [[f"blk.{l}.{g}" for m, g, _, _ in _layer_tensors(cfg) if m == n] for l in range(cfg.n_layers)]
        types = [[f.tensor_infos[t].type for t in layer] for layer in layers]
        if all(k in QDOT_CODES for ks in types for k in ks) \
                and all(len({QDOT_BLOCK[QDOT_CODES[k]] for k in ks}) == 1 for ks in types):
            out[n] = layers
    return out


def _dequantized(f: GGUFFile, name: str, out: np.ndarray) -> np.ndarray:
    """A tensor as float32 written into `out` (a parameter's slice: no temporary copy),
    refused (FormatError naming it) when a value is NaN or infinite."""
    return require_finite(f.dequantize(name, out), f"{f.path}: tensor {name!r}")


def _raw_rows(f: GGUFFile, name: str) -> np.ndarray:
    """The stored blocks of a (OC, C) matrix as a (OC, bytes per row) uint8 copy; the blocks'
    float16 scales (the first two bytes in Q8_0 and Q4_0, the last two in TQ2_0) must be finite."""
    rows = np.array(f.raw(name)).reshape(f.tensor_infos[name].shape[0], -1)
    f.release(name)   # the copy is what the model keeps: the mapped pages leave the RSS
    block, at, n = {"Q8_0": (34, 0, 1), "Q4_0": (18, 0, 1), "Q4_K": (144, 0, 2), "Q6_K": (210, 208, 1),
                    "Q5_0": (22, 0, 1), "TQ2_0": (66, 64, 1), "TQ1_0": (54, 52, 1)}[f.tensor_infos[name].type]   # bytes, first f16 scale, scales
    scales = rows.reshape(-1, block)[:, at:at + 2 * n].copy().view("<f2")
    require_finite(scales, f"{f.path}: tensor {name!r} (block scales)")
    if f.tensor_infos[name].type in bitnet.GGUF_TYPES:   # a BitNet projection: nt runs it as T2 rows
        try:
            return bitnet.from_gguf_rows(rows, f.tensor_infos[name].type)
        except ValueError as e:
            raise FormatError(f"{f.path}: tensor {name!r}: {e}") from None
    return rows


def _llama_import(f: GGUFFile, cfg: LlamaConfig, device: str, keep_quantized: bool) -> Llama:
    quantized = _kept_quantized(f, cfg) if keep_quantized or cfg.bitnet else {}
    if device != "cpu":   # the K-quant and Q5_0 kernels are CPU-only: dequantise those matrices
        quantized = {n: k for n, k in quantized.items() if k not in ("Q4_K", "Q6_K", "Q5_0")}
    model = Llama(cfg, device=device, seed=None, quantized=quantized)
    # on the CPU the parameters are filled in place (no second copy of the weights at the
    # peak); elsewhere through one host array
    in_place = device == "cpu" and model.params.size == model.params.numel
    host = model.params.flat if in_place else np.empty(model.params.numel, dtype=np.float32)
    host[:] = 0.0   # the embedding's padded rows
    p = _param_views(model, host)
    _dequantized(f, "token_embd.weight", p["wte"][:cfg.vocab_size])
    embd_type = f.tensor_infos["token_embd.weight"].type
    decode_only = _decode_only(f, cfg, quantized) if keep_quantized and device == "cpu" else {}
    if (quantized or decode_only) and cfg.tie_embeddings and device == "cpu" and embd_type in ops.QUANT_FORMATS:
        model.tied_head = (embd_type, _raw_rows(f, "token_embd.weight"))   # the decoder's classifier
    tensors = _layer_tensors(cfg)
    decode_rows = {n: [] for n in decode_only}
    for l in range(cfg.n_layers):
        for n, layers in decode_only.items():   # before _dequantized below releases the pages
            decode_rows[n] += [_raw_rows(f, t).reshape(-1) for t in layers[l]]
        for n in quantized.keys() & set(_KEPT_MATRICES):
            rows = np.concatenate([_raw_rows(f, f"blk.{l}.{g}") for m, g, _, _ in tensors if m == n])
            if l == 0:   # all layers in one (L, OC, bytes) array: the fused decoder reads it whole
                model.qweights[n] = np.empty((cfg.n_layers,) + rows.shape, np.uint8)
            model.qweights[n][l] = rows
        for n, g, a, b in tensors:
            if n not in quantized:
                _dequantized(f, f"blk.{l}.{g}", p[n][l][a:b])
    _dequantized(f, "output_norm.weight", p["norm_f"])
    if "lm_head" in quantized:
        model.qweights["lm_head"] = _raw_rows(f, "output.weight")
    elif not cfg.tie_embeddings:
        _dequantized(f, "output.weight", p["lm_head"][:cfg.vocab_size])
    model.decode_blocks = {n: (np.concatenate(decode_rows[n]), [[f.tensor_infos[t].type for t in layer]
                                                                for layer in layers])
                           for n, layers in decode_only.items()}
    if not in_place:
        model.load_flat(host)
    if device != "cpu":   # the blocks live where the matmul runs
        model.qweights = {n: model.tape.k.to_device(rows) for n, rows in model.qweights.items()}
    return model


def _rope_rows(x: np.ndarray, n_heads: int, to: str) -> np.ndarray:
    """x (a q or k projection's rows, biases or qk-norm weights: heads along axis 0) with
    each head's rows reordered for RoPE pairing `to`: "interleaved" moves pair (i, i + hs/2)
    to (2i, 2i + 1), row 2i + k taking row k*hs/2 + i (llama.cpp's converter does this to
    HF checkpoints for its "llama" architecture); "half" undoes it."""
    rest = x.shape[1:]
    heads = x.reshape(n_heads, 2, -1, *rest) if to == "interleaved" else x.reshape(n_heads, -1, 2, *rest)
    return heads.swapaxes(1, 2).reshape(x.shape)


def _llama_arch(cfg: LlamaConfig) -> str:
    """The llama.cpp architecture whose graph computes what an nt Llama of `cfg` computes."""
    wanted = {arch: {**_LLAMA_COMMON, **spec.options} for arch, spec in LLAMA_ARCHS.items()}
    for arch, options in wanted.items():
        if all(getattr(cfg, k) == v for k, v in options.items()):
            return arch
    differences = "; ".join(f"{arch} needs " + ", ".join(f"{k}={v!r}" for k, v in options.items() if getattr(cfg, k) != v)
                            for arch, options in wanted.items())
    raise ValueError(f"no llama.cpp architecture nt writes computes this Llama ({differences})")


def _gemma3_metadata(cfg: LlamaConfig) -> dict:
    """gemma3.* keys beyond the common ones: the sliding window, the layer pattern and the
    local RoPE base (see GEMMA3_PATTERN). No window: no keys, which llama.cpp versions with
    an optional window read as every layer global, as load does (others refuse the file)."""
    if cfg.sliding_window == 0:
        return {}
    return {"gemma3.attention.sliding_window": cfg.sliding_window,
            "gemma3.attention.sliding_window_pattern": cfg.global_every,
            "gemma3.rope.freq_base_swa": float(cfg.rope_local_theta or cfg.rope_theta)}


def _ternary_weights(model: Llama, name: str, l: int) -> np.ndarray:
    """Layer l of a BitNet model's projection `name` as the float32 ternary values its forward
    multiplies by: unpacked T2 rows, or the quantised latent weights."""
    if name in model.quantized:
        return bitnet.unpack_weights(np.asarray(model.qweights[name][l]))
    return bitnet.quantized_weight(model.params[name][l].numpy())[0]


def _llama_export(model: Llama) -> tuple[dict, dict]:
    cfg = model.config
    if model.quantized and not (cfg.bitnet and set(model.quantized.values()) == {"T2"}):
        raise ValueError(f"cannot export a Llama that keeps {sorted(model.quantized)} quantised; "
                         "load it with keep_quantized=False")
    arch = _llama_arch(cfg)
    V, C, hs, NH, NKV = cfg.vocab_size, cfg.dim, cfg.hs, cfg.n_heads, cfg.n_kv_heads
    meta = {
        "general.architecture": arch, "general.name": f"nt-{arch}",
        f"{arch}.context_length": cfg.block_size, f"{arch}.embedding_length": C,
        f"{arch}.block_count": cfg.n_layers, f"{arch}.feed_forward_length": cfg.ffn_hidden,
        f"{arch}.attention.head_count": NH, f"{arch}.attention.head_count_kv": NKV,
        f"{arch}.rope.dimension_count": hs, f"{arch}.rope.freq_base": float(cfg.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps), f"{arch}.vocab_size": V,
    }
    if hs * NH != C or arch == "gemma3":   # llama.cpp's converter always states Gemma-3's
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = hs
    if arch == "gemma3":
        meta.update(_gemma3_metadata(cfg))
    p = _param_views(model, model.params.to_flat().astype(np.float32, copy=False))
    if cfg.bitnet:   # the ternary weights the forward uses (codes times scale), which TQ2_0 keeps exactly
        p.update({n: np.stack([_ternary_weights(model, n, l) for l in range(cfg.n_layers)]) for n in bitnet.BITLINEAR})
    pairing = LLAMA_ARCHS[arch].rope_pairing
    heads = {"attn_q.weight": NH, "attn_q.bias": NH, "attn_k.weight": NKV, "attn_k.bias": NKV,
             "attn_q_norm.weight": 1, "attn_k_norm.weight": 1}
    arrays = {"token_embd.weight": p["wte"][:V]}
    for l in range(cfg.n_layers):
        for n, g, a, b in _layer_tensors(cfg):
            x = p[n][l][a:b]
            if g in heads and cfg.rope_pairing != pairing:
                x = _rope_rows(x, heads[g], pairing)
            arrays[f"blk.{l}.{g}"] = x
    arrays["output_norm.weight"] = p["norm_f"]
    if not cfg.tie_embeddings:   # tied: llama.cpp falls back to token_embd when output is absent
        arrays["output.weight"] = p["lm_head"][:V]
    return meta, arrays


# ====================================================================== tokenizer

# tokenizer.ggml.pre values (llama.cpp's names) -> nt.tokenizer's pre-tokenizers
GGUF_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "llama3": "llama3", "llama-bpe": "llama3", "llama-v3": "llama3",
    "qwen2": "qwen2", "stablelm2": "qwen2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
}


def _token_id(f: GGUFFile, key: str, n: int) -> Optional[int]:
    """A token id metadata value in [0, n), or None when absent."""
    v = _get(f, key, "int")
    if v is not None and not 0 <= v < n:
        raise _bad(f, key, f"{v} is not a token id in [0, {n})")
    return v


def _gpt2_vocabulary(f: GGUFFile, tokens: list[str], types: Optional[np.ndarray]) -> BPE:
    merges = _get(f, "tokenizer.ggml.merges", "strings", [])
    special = None if types is None else [t for t, k in zip(tokens, types) if k in (SP_CONTROL, SP_USER_DEFINED)]
    pre_name = _get(f, "tokenizer.ggml.pre", "string", "default")
    pre = GGUF_PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        warnings.warn(f"{f.path}: tokenizer.ggml.pre {pre_name!r} is not one nt knows "
                      f"({', '.join(sorted(GGUF_PRE_TOKENIZERS))}); splitting text as GPT-2 does, "
                      "so some token ids may differ from the model's own tokenizer")
        pre = "gpt2"
    try:
        tok = BPE.from_tokens(tokens, merges, special, pre)
    except ValueError as e:
        raise FormatError(f"{f.path}: bad gpt2 vocabulary: {e}") from None
    tok.add_bos = _get(f, "tokenizer.ggml.add_bos_token", "bool", False)
    return tok


def _sentencepiece_vocabulary(f: GGUFFile, tokens: list[str], types: Optional[np.ndarray]) -> SentencePieceBPE:
    scores = _array(f, "tokenizer.ggml.scores", "floats", len(tokens))
    if scores is not None and np.isnan(scores).any():
        raise _bad(f, "tokenizer.ggml.scores", f"score of token {int(np.argmax(np.isnan(scores)))} is NaN")
    add_space_prefix = _get(f, "tokenizer.ggml.add_space_prefix", "bool", True)
    unk_id = _token_id(f, "tokenizer.ggml.unknown_token_id", len(tokens))
    try:
        tok = SentencePieceBPE(tokens, scores, types, add_space_prefix=add_space_prefix, unk_id=unk_id)
    except ValueError as e:   # e.g. a byte token <0xZZ>
        raise FormatError(f"{f.path}: bad llama vocabulary: {e}") from None
    tok.add_bos = _get(f, "tokenizer.ggml.add_bos_token", "bool", True)
    return tok


def tokenizer_from_metadata(f: GGUFFile) -> Optional[Union[BPE, SentencePieceBPE]]:
    """The tokenizer a GGUF file describes in its tokenizer.ggml.* keys, or None (model
    "none" or no vocabulary). Model "gpt2": byte-level BPE (nt.tokenizer.BPE, with the
    pre-tokenizer tokenizer.ggml.pre names: GGUF_PRE_TOKENIZERS; absent means GPT-2's, an
    unknown name warns and falls back to GPT-2's) from tokens + merges; model "llama": SentencePiece BPE
    (nt.tokenizer.SentencePieceBPE) from tokens + scores + token_type. The result carries
    bos_id, eos_id, add_bos and chat_template (the Jinja source, or None). Every key is
    checked for its type, length and range: a bad one is a FormatError naming it."""
    kind = _get(f, "tokenizer.ggml.model", "string", "none")
    tokens = _get(f, "tokenizer.ggml.tokens", "strings")
    if kind == "none" or tokens is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise _bad(f, "tokenizer.ggml.model", f"{kind!r} is not supported (supported: gpt2, llama)")
    if not tokens:
        raise _bad(f, "tokenizer.ggml.tokens", "the vocabulary is empty")
    types = _array(f, "tokenizer.ggml.token_type", "ints", len(tokens))
    if types is not None and ((types < SP_NORMAL) | (types > SP_BYTE)).any():
        i = int(np.argmax((types < SP_NORMAL) | (types > SP_BYTE)))
        raise _bad(f, "tokenizer.ggml.token_type", f"token {i} has type {types[i]}, "
                                                   f"not one of SentencePiece's {SP_NORMAL}..{SP_BYTE}")
    if kind == "gpt2":
        tok = _gpt2_vocabulary(f, tokens, types)
    else:
        tok = _sentencepiece_vocabulary(f, tokens, types)
    tok.bos_id = _token_id(f, "tokenizer.ggml.bos_token_id", len(tokens))
    tok.eos_id = _token_id(f, "tokenizer.ggml.eos_token_id", len(tokens))
    if tok.add_bos and tok.bos_id is None:
        tok.add_bos = False
    tok.chat_template = _get(f, "tokenizer.chat_template", "string")
    return tok


# the tokenizer.ggml.pre name under which llama.cpp splits text as each of nt's
# pre-tokenizers does (GGUF_PRE_TOKENIZERS reads each back to the same one)
PRE_TOKENIZER_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "digits": "smollm"}


def _gpt2_vocabulary_metadata(tok: BPE) -> tuple[dict, list[str], list[int]]:
    """(keys, tokens, token types) of a byte-level BPE: tokens spelled through GPT-2's
    byte-to-unicode map (special tokens as their text, control tokens), merges in rank
    order, llama.cpp's name for the pre-tokenizer; <|endoftext|> is bos and eos unless the
    tokenizer names its own."""
    enc = bytes_to_unicode()
    tokens = [tok.vocab[i].decode("utf-8") if i in tok.special_ids else "".join(enc[b] for b in tok.vocab[i])
              for i in range(tok.vocab_size)]
    types = [SP_CONTROL if i in tok.special_ids else SP_NORMAL for i in range(tok.vocab_size)]
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": PRE_TOKENIZER_NAMES[tok.pre],
            "tokenizer.ggml.merges": [f"{tokens[a]} {tokens[b]}" for a, b in tok.merges]}
    default = tok.special_tokens.get(ENDOFTEXT)
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        value = default if value is None else value
        if value is not None:
            keys[f"tokenizer.ggml.{key}_token_id"] = int(value)
    return keys, tokens, types


def _sentencepiece_metadata(tok: SentencePieceBPE) -> tuple[dict, list[str], list[int]]:
    """(keys, tokens, token types) of a SentencePiece BPE: pieces, scores, types as they are."""
    keys = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.add_space_prefix": tok.add_space_prefix}
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unknown", tok.unk_id)):
        if value is not None:
            keys[f"tokenizer.ggml.{key}_token_id"] = int(value)
    return keys, list(tok.tokens), [int(t) for t in tok.types]


def tokenizer_metadata(tokenizer: Union[BPE, SentencePieceBPE], vocab_size: int) -> dict:
    """The tokenizer.ggml.* keys (and tokenizer.chat_template) that describe `tokenizer` to
    llama.cpp and to tokenizer_from_metadata, for a model of `vocab_size` embedding rows:
    model "gpt2" for nt's byte-level BPE, "llama" for SentencePiece. llama.cpp wants one
    token per row, so a smaller vocabulary is padded with unused tokens "[PAD<id>]" (as
    llama.cpp's converter pads); a larger one is a ValueError."""
    if isinstance(tokenizer, BPE):
        keys, tokens, types = _gpt2_vocabulary_metadata(tokenizer)
        scores = None
    elif isinstance(tokenizer, SentencePieceBPE):
        keys, tokens, types = _sentencepiece_metadata(tokenizer)
        scores = [float(s) for s in tokenizer.scores]
    else:
        raise TypeError(f"cannot describe a {type(tokenizer).__name__} in GGUF (supported: BPE, SentencePieceBPE)")
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, the model's embedding only {vocab_size} rows")
    pad = range(len(tokens), vocab_size)
    keys["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in pad]
    keys["tokenizer.ggml.token_type"] = np.array(types + [SP_UNUSED] * len(pad), dtype=np.int32)
    if scores is not None:
        keys["tokenizer.ggml.scores"] = np.array(scores + [0.0] * len(pad), dtype=np.float32)
    keys["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    if tokenizer.chat_template is not None:
        keys["tokenizer.chat_template"] = tokenizer.chat_template
    return keys


# ====================================================================== entry points

def load(path, device: str = "cpu", keep_quantized: bool = False) -> LanguageModel:
    """Build an nt model from a GGUF file: GPT2 for architecture "gpt2", Llama for "llama",
    "qwen2", "qwen3" and "gemma3" (LLAMA_ARCHS), in the RoPE pairing of llama.cpp's graph for that
    architecture (interleaved for "llama", half for the others), so q/k are used as stored.
    Weights are dequantised to float32. A GPT-2 `output.weight`, if present, is taken to be
    tied to token_embd (nt's GPT-2 ties them); a Llama without `output.weight` is tied.
    Gemma-3: norm weights are used as stored (llama.cpp's converter stores HF's 1 + w), the
    sliding window comes from gemma3.attention.sliding_window (none: every layer global),
    the pattern from gemma3.attention.sliding_window_pattern (default 6: five local layers,
    then a global one) and the local RoPE base from gemma3.rope.freq_base_swa (default 10000).

    keep_quantized=True (Llama without q/k/v biases, CPU or CUDA): Q8_0 / Q4_0 matrices (on
    the CPU also Q4_K / Q6_K) stay as their blocks (model.qweights) and run through
    ops.linear_q and the fused decoding step, for inference only;
    other types, the embedding and the norms are float32. `model.tokenizer` is the file's
    tokenizer (see tokenizer_from_metadata) or None.

    The metadata, the whole tensor directory and the tokenizer are checked before the model
    is built (see the module's docstring): a bad file is a FormatError, raised fast."""
    with GGUFFile(path) as f:
        arch = _need(f, "general.architecture", "string")
        if arch == "gpt2":
            cfg = _gpt2_config(f)
        elif arch in LLAMA_ARCHS:
            cfg = _llama_config(f, arch)
        else:
            raise _bad(f, "general.architecture", f"{arch!r} is not supported (supported: gpt2, {', '.join(LLAMA_ARCHS)})")
        tokenizer = tokenizer_from_metadata(f)
        if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
            raise _bad(f, "tokenizer.ggml.tokens", f"{tokenizer.vocab_size} tokens but token_embd.weight "
                                                   f"has only {cfg.vocab_size} rows")
        if arch == "gpt2":
            model = _gpt2_import(f, cfg, device)
        else:
            model = _llama_import(f, cfg, device, keep_quantized)
    model.tokenizer = tokenizer
    return model


def write(path, model: LanguageModel, dtype: str = "F32", metadata: Optional[dict] = None,
          tokenizer: Optional[Union[BPE, SentencePieceBPE]] = None) -> None:
    """Export an nt GPT2 or Llama to GGUF for llama.cpp: architecture "gpt2" for GPT2; for a
    Llama the one of "llama", "qwen2", "qwen3", "gemma3" whose graph computes the same function
    (_llama_arch; anything else is a ValueError naming what differs). Matrices as `dtype`
    (one of nt.io.gguf.WRITE_TYPES), norms and biases as F32. q/k rows (and their biases
    and qk-norm weights) are permuted when the model's RoPE pairing is not the
    architecture's, as llama.cpp's converter does for "llama". `<arch>.vocab_size` and
    `<arch>.context_length` are always written, so readers size the model from the file.

    `tokenizer` (nt's BPE or a SentencePieceBPE, e.g. one a GGUF file carried) is embedded
    as tokenizer.ggml.* (tokenizer_metadata); without one tokenizer.ggml.model is "none"
    (llama.cpp runs on token ids). `metadata` adds or overrides keys last."""
    if dtype not in WRITE_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(WRITE_TYPES)}, got {dtype!r}")
    bitnet_model = isinstance(model, Llama) and model.config.bitnet
    if (dtype in bitnet.GGUF_TYPES) != bitnet_model:
        raise ValueError("a BitNet Llama (config.bitnet) is written as TQ2_0 or TQ1_0, and those hold only BitNet "
                         f"models' ternary weights; got dtype {dtype!r} for a {'' if bitnet_model else 'non-'}BitNet model")
    if isinstance(model, GPT2):
        meta, arrays = _gpt2_export(model)
    elif isinstance(model, Llama):
        meta, arrays = _llama_export(model)
    else:
        raise TypeError(f"cannot export a {type(model).__name__} to GGUF (supported: GPT2, Llama)")
    meta["general.file_type"] = FILE_TYPES[dtype]
    if tokenizer is None:
        # llama.cpp refuses a file without a tokenizer model; "none" (vocab_size dummy
        # tokens) lets it run on token ids
        meta["tokenizer.ggml.model"] = "none"
    else:
        meta.update(tokenizer_metadata(tokenizer, model.config.vocab_size))
    meta.update(metadata or {})
    _, bs, _ = GGML_TYPES[GGML_TYPE_IDS[dtype]]
    # BitNet: only the projections are ternary; the embedding and classifier stay F32
    ternary = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
    uneven = [n for n, a in arrays.items() if dtype in bitnet.GGUF_TYPES and n.split(".", 2)[-1].startswith(ternary)
              and a.shape[-1] % bs]
    if uneven:
        raise ValueError(f"{dtype} packs rows in blocks of {bs} weights: {uneven[0]} has shape {arrays[uneven[0]].shape} "
                         f"(a BitNet model exported to GGUF needs widths that are multiples of {bs})")
    tensors = {name: (a, dtype if a.ndim >= 2 and a.shape[-1] % bs == 0
                      and (dtype not in bitnet.GGUF_TYPES or name.split(".", 2)[-1].startswith(ternary)) else "F32")
               for name, a in arrays.items()}
    write_gguf(path, meta, tensors)
