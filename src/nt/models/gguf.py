"""nt's GPT2 and Llama to and from GGUF files: llama.cpp's tensor names and metadata keys
for the "gpt2" and "llama" architectures, and the tokenizer that tokenizer.ggml.* describes.

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
from typing import Any, Optional, Union

import numpy as np

from .. import ops
from ..io.common import FormatError
from ..io.gguf import DEQUANTIZE_TYPES, FILE_TYPES, GGML_TYPE_IDS, GGML_TYPES, WRITE_TYPES, GGUFFile, write_gguf
from ..tokenizer import BPE, SP_BYTE, SP_CONTROL, SP_NORMAL, SP_USER_DEFINED, SentencePieceBPE
from .base import LanguageModel
from .gpt2 import GPT2, GPT2Config, param_layout as gpt2_param_layout
from .llama import Llama, LlamaConfig

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
    host = np.zeros(model.params.size, dtype=np.float32)
    for nt_name, gguf_name in GPT2_TENSOR_NAMES:
        t = model.params[nt_name]
        view = host[t.offset:t.offset + t.size].reshape(t.shape)
        if nt_name == "wte":
            view[:cfg.vocab_size] = f.dequantize(gguf_name)
        elif "{l}" in gguf_name:
            for l in range(cfg.n_layer):
                view[l] = f.dequantize(gguf_name.format(l=l))
        else:
            view[:] = f.dequantize(gguf_name)
    model.load_flat(host)
    return model


def _gpt2_export(model: GPT2) -> tuple[dict, dict]:
    cfg = model.config
    host = model.tape.k.to_host(model.params.flat)
    meta = {
        "general.architecture": "gpt2", "general.name": "nt-gpt2",
        "gpt2.context_length": cfg.block_size, "gpt2.embedding_length": cfg.n_embd,
        "gpt2.feed_forward_length": 4 * cfg.n_embd, "gpt2.block_count": cfg.n_layer,
        "gpt2.attention.head_count": cfg.n_head, "gpt2.attention.layer_norm_epsilon": GPT2_EPS,
        "gpt2.vocab_size": cfg.vocab_size,
    }
    values = {}
    for nt_name, _ in GPT2_TENSOR_NAMES:
        t = model.params[nt_name]
        values[nt_name] = host[t.offset:t.offset + t.size].reshape(t.shape)
    values["wte"] = values["wte"][:cfg.vocab_size]   # drop nt's vocabulary padding
    per_layer = [(n, g) for n, g in GPT2_TENSOR_NAMES if "{l}" in g]
    arrays = {g: values[n] for n, g in GPT2_TENSOR_NAMES if "{l}" not in g and not g.startswith("output")}
    for l in range(cfg.n_layer):   # llama.cpp's order: layer by layer
        arrays.update({g.format(l=l): values[n][l] for n, g in per_layer})
    arrays.update({g: values[n] for n, g in GPT2_TENSOR_NAMES if g.startswith("output")})
    # the classifier is tied to the embedding; llama.cpp's converter writes it out as well
    arrays["output.weight"] = arrays["token_embd.weight"]
    return meta, arrays


# ====================================================================== Llama

# nt Llama matrix -> the GGUF tensors stacked (along rows) to make it, per layer
_LLAMA_MATRICES = {"qkvw": ("attn_q", "attn_k", "attn_v"), "attn_out": ("attn_output",),
                   "gate_up": ("ffn_gate", "ffn_up"), "down": ("ffn_down",)}

# What nt's Llama must look like to be llama.cpp's "llama" architecture.
_LLAMA_PLAIN = dict(norm="rmsnorm", ffn_kind="swiglu", qkv_bias=False, qk_norm=False, post_norms=False,
                    embed_scale=False, sliding_window=0, n_predict=1)


def _llama_shapes(cfg: LlamaConfig) -> dict[str, tuple]:
    """llama.cpp tensor name -> NumPy shape for a Llama of `cfg`."""
    V, C, H, hs, NH, NKV = cfg.vocab_size, cfg.dim, cfg.ffn_hidden, cfg.hs, cfg.n_heads, cfg.n_kv_heads
    per_layer = {"attn_norm": (C,), "attn_q": (NH * hs, C), "attn_k": (NKV * hs, C), "attn_v": (NKV * hs, C),
                 "attn_output": (C, NH * hs), "ffn_norm": (C,), "ffn_gate": (H, C), "ffn_up": (H, C),
                 "ffn_down": (C, H)}
    shapes = {"token_embd.weight": (V, C)}
    for l in range(cfg.n_layers):
        shapes.update({f"blk.{l}.{g}.weight": shape for g, shape in per_layer.items()})
    shapes["output_norm.weight"] = (C,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, C)
    return shapes


def _llama_config(f: GGUFFile) -> LlamaConfig:
    """The LlamaConfig a "llama" file describes (llama.cpp's interleaved RoPE pairing), its
    metadata and whole directory checked. No `output.weight` means a tied classifier."""
    unsupported = "RoPE scaling is not supported by nt's Llama"
    if "rope_freqs.weight" in f:
        raise FormatError(f"{f.path}: tensor 'rope_freqs.weight': {unsupported}")
    if _get(f, "llama.rope.scaling.type", "string", "none") not in ("none", "linear"):
        raise _bad(f, "llama.rope.scaling.type", unsupported)
    if _get(f, "llama.rope.scaling.factor", "float", 1.0) != 1.0:   # NaN included
        raise _bad(f, "llama.rope.scaling.factor", unsupported)
    C, L = _size(f, "llama.embedding_length"), _size(f, "llama.block_count")
    NH = _size(f, "llama.attention.head_count")
    NKV = _size(f, "llama.attention.head_count_kv", NH)
    H, T = _size(f, "llama.feed_forward_length"), _size(f, "llama.context_length")
    if T > MAX_CONTEXT:
        raise _bad(f, "llama.context_length", f"{T} positions is past nt's limit of {MAX_CONTEXT}")
    if NH % NKV:
        raise _bad(f, "llama.attention.head_count_kv", f"{NKV} key/value heads do not divide the {NH} query heads")
    if "llama.attention.key_length" in f.metadata:
        hs = _size(f, "llama.attention.key_length")
    elif C % NH:
        raise _bad(f, "llama.attention.head_count", f"{NH} heads do not divide the width {C} "
                                                    "(llama.embedding_length) and no llama.attention.key_length is given")
    else:
        hs = C // NH
    for key in ("llama.rope.dimension_count", "llama.attention.value_length"):
        if _size(f, key, hs) != hs:
            raise _bad(f, key, f"partial RoPE or distinct key/value head sizes are not supported (head size {hs})")
    eps = _positive(f, "llama.attention.layer_norm_rms_epsilon")
    theta = _positive(f, "llama.rope.freq_base", 10000.0)
    V = _rows(f, "token_embd.weight")
    if _size(f, "llama.vocab_size", V) != V:
        raise _bad(f, "llama.vocab_size", f"{f.metadata['llama.vocab_size']} but token_embd.weight has {V} rows")
    _check_layer_count(f, "llama.block_count", L, 9)   # 2 norms and 7 matrices a layer
    try:
        cfg = LlamaConfig(dim=C, n_layers=L, n_heads=NH, n_kv_heads=NKV, ffn_hidden=H, vocab_size=V, block_size=T,
                          head_dim=0 if hs * NH == C else hs, norm_eps=eps, rope_theta=theta,
                          rope_pairing="interleaved", tie_embeddings="output.weight" not in f)
    except ValueError as e:
        raise FormatError(f"{f.path}: metadata describe an impossible Llama: {e}") from None
    _check_directory(f, "llama", _llama_shapes(cfg))
    return cfg


def _kept_quantized(f: GGUFFile, cfg: LlamaConfig) -> dict[str, str]:
    """{nt matrix: ggml type} for the matrices whose every GGUF tensor is one type that
    ops.linear_q reads (Q8_0, Q4_0); the others are dequantised."""
    groups = {n: [f"blk.{l}.{g}.weight" for l in range(cfg.n_layers) for g in parts]
              for n, parts in _LLAMA_MATRICES.items()}
    if not cfg.tie_embeddings:
        groups["lm_head"] = ["output.weight"]
    out = {}
    for n, names in groups.items():
        types = {f.tensor_infos[m].type for m in names}
        if len(types) == 1 and next(iter(types)) in ops.QUANT_FORMATS:
            out[n] = next(iter(types))
    return out


def _raw_rows(f: GGUFFile, name: str) -> np.ndarray:
    """The stored blocks of a (OC, C) matrix as a (OC, bytes per row) uint8 copy."""
    return np.array(f.raw(name)).reshape(f.tensor_infos[name].shape[0], -1)


def _llama_import(f: GGUFFile, cfg: LlamaConfig, device: str, keep_quantized: bool) -> Llama:
    quantized = _kept_quantized(f, cfg) if keep_quantized and device == "cpu" else {}
    model = Llama(cfg, device=device, seed=None, quantized=quantized)
    host = np.zeros(model.params.size, dtype=np.float32)
    p = {name: host[t.offset:t.offset + t.size].reshape(t.shape) for name, t in model.params.items()}
    p["wte"][:cfg.vocab_size] = f.dequantize("token_embd.weight")
    for l in range(cfg.n_layers):
        b = f"blk.{l}."
        p["attn_norm"][l] = f.dequantize(b + "attn_norm.weight")
        p["ffn_norm"][l] = f.dequantize(b + "ffn_norm.weight")
        for n, parts in _LLAMA_MATRICES.items():
            if n in quantized:
                model.qweights[n][l] = np.concatenate([_raw_rows(f, f"{b}{g}.weight") for g in parts])
            else:
                p[n][l] = np.concatenate([f.dequantize(f"{b}{g}.weight") for g in parts])
    p["norm_f"][:] = f.dequantize("output_norm.weight")
    if "lm_head" in quantized:
        model.qweights["lm_head"] = _raw_rows(f, "output.weight")
    elif not cfg.tie_embeddings:
        p["lm_head"][:cfg.vocab_size] = f.dequantize("output.weight")
    model.load_flat(host)
    return model


def _rope_rows_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (n_heads*hs, C) so that RoPE pairs (i, i+hs/2)
    become pairs (2i, 2i+1): row 2i+k of a head takes row k*hs/2 + i. llama.cpp's converter
    applies this permutation to HF checkpoints for the "llama" architecture."""
    R, C = w.shape
    return w.reshape(n_heads, 2, R // n_heads // 2, C).swapaxes(1, 2).reshape(R, C)


def _llama_export(model: Llama) -> tuple[dict, dict]:
    cfg = model.config
    odd = {k: getattr(cfg, k) for k, v in _LLAMA_PLAIN.items() if getattr(cfg, k) != v}
    if odd:
        raise ValueError(f"llama.cpp's llama architecture has no equivalent of {odd}")
    host = model.tape.k.to_host(model.params.flat)
    p = {}
    for name, t in model.params.items():
        p[name] = host[t.offset:t.offset + t.size].reshape(t.shape)
    V, C, H, hs, NH, NKV = cfg.vocab_size, cfg.dim, cfg.ffn_hidden, cfg.hs, cfg.n_heads, cfg.n_kv_heads
    meta = {
        "general.architecture": "llama", "general.name": "nt-llama",
        "llama.context_length": cfg.block_size, "llama.embedding_length": C,
        "llama.block_count": cfg.n_layers, "llama.feed_forward_length": H,
        "llama.attention.head_count": NH, "llama.attention.head_count_kv": NKV,
        "llama.rope.dimension_count": hs, "llama.rope.freq_base": float(cfg.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps), "llama.vocab_size": V,
    }
    if hs * NH != C:
        meta["llama.attention.key_length"] = meta["llama.attention.value_length"] = hs
    arrays = {"token_embd.weight": p["wte"][:V]}
    for l in range(cfg.n_layers):
        qkv = p["qkvw"][l]
        q, k, v = qkv[:NH * hs], qkv[NH * hs:(NH + NKV) * hs], qkv[(NH + NKV) * hs:]
        if cfg.rope_pairing == "half":
            q, k = _rope_rows_half_to_interleaved(q, NH), _rope_rows_half_to_interleaved(k, NKV)
        arrays.update({
            f"blk.{l}.attn_norm.weight": p["attn_norm"][l], f"blk.{l}.attn_q.weight": q,
            f"blk.{l}.attn_k.weight": k, f"blk.{l}.attn_v.weight": v,
            f"blk.{l}.attn_output.weight": p["attn_out"][l], f"blk.{l}.ffn_norm.weight": p["ffn_norm"][l],
            f"blk.{l}.ffn_gate.weight": p["gate_up"][l][:H], f"blk.{l}.ffn_up.weight": p["gate_up"][l][H:],
            f"blk.{l}.ffn_down.weight": p["down"][l],
        })
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


# ====================================================================== entry points

def load(path, device: str = "cpu", keep_quantized: bool = False) -> LanguageModel:
    """Build an nt model from a GGUF file: GPT2 for architecture "gpt2", Llama (with
    llama.cpp's interleaved RoPE pairing, so q/k are used as stored) for "llama". Weights
    are dequantised to float32. A GPT-2 `output.weight`, if present, is taken to be tied
    to token_embd (nt's GPT-2 ties them); a Llama without `output.weight` is tied.

    keep_quantized=True (Llama on the CPU): Q8_0 / Q4_0 matrices stay as their blocks
    (model.qweights) and run through ops.linear_q, for inference only; other types, the
    embedding and the norms are float32. `model.tokenizer` is the file's tokenizer (see
    tokenizer_from_metadata) or None.

    The metadata, the whole tensor directory and the tokenizer are checked before the model
    is built (see the module's docstring): a bad file is a FormatError, raised fast."""
    with GGUFFile(path) as f:
        arch = _need(f, "general.architecture", "string")
        if arch == "gpt2":
            cfg = _gpt2_config(f)
        elif arch == "llama":
            cfg = _llama_config(f)
        else:
            raise _bad(f, "general.architecture", f"{arch!r} is not supported (supported: gpt2, llama)")
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


def write(path, model: LanguageModel, dtype: str = "F32", metadata: Optional[dict] = None) -> None:
    """Export an nt GPT2 or Llama to GGUF for llama.cpp (architectures "gpt2" and "llama"):
    matrices as `dtype` (one of nt.io.gguf.WRITE_TYPES), norms and biases as F32. A Llama
    with HF's "half" RoPE pairing has its q/k rows permuted to llama.cpp's interleaved
    pairing, as llama.cpp's converter does. `metadata` adds or overrides keys: nt models
    carry no vocabulary, so tokenizer.ggml.model is "none" (llama.cpp runs on token ids)
    unless the tokenizer.ggml.* keys are passed here."""
    if dtype not in WRITE_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(WRITE_TYPES)}, got {dtype!r}")
    if isinstance(model, GPT2):
        meta, arrays = _gpt2_export(model)
    elif isinstance(model, Llama):
        meta, arrays = _llama_export(model)
    else:
        raise TypeError(f"cannot export a {type(model).__name__} to GGUF (supported: GPT2, Llama)")
    meta["general.file_type"] = FILE_TYPES[dtype]
    # llama.cpp refuses a file without a tokenizer model; "none" (vocab_size dummy tokens)
    # lets it run on token ids. Callers with a vocabulary pass tokenizer.ggml.* instead.
    meta["tokenizer.ggml.model"] = "none"
    meta.update(metadata or {})
    _, bs, _ = GGML_TYPES[GGML_TYPE_IDS[dtype]]
    tensors = {name: (a, dtype if a.ndim >= 2 and a.shape[-1] % bs == 0 else "F32")
               for name, a in arrays.items()}
    write_gguf(path, meta, tensors)
