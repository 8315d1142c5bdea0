"""nt's GPT2 and Llama to and from Hugging Face model folders, as transformers'
save_pretrained writes them: config.json, and the weights in model.safetensors or in
shards listed by model.safetensors.index.json.

    model_type (config.json)                       nt model
    gpt2                                           GPT2
    llama, mistral, qwen2, gemma3_text             Llama (one LlamaConfig per family, below)
    gemma3 (multimodal: its text_config)           Llama; the vision tower is not loaded

The names and layouts are mapped by ONE table per architecture (GPT2_TENSORS,
LLAMA_TENSORS, GEMMA3_TENSORS): nt parameter <- the HF tensors that make it, with the
transform between the two layouts. Per-layer nt tensors are stacked (L, ...); a fused nt
matrix (Llama's qkvw, gate_up) is the rows of its HF tensors stacked in the table's order.

Loading treats the folder as hostile and checks everything before it builds the model:
config.json's fields (types, values, and no field nt does not understand), every shard's
header, and the tensor directory against the config (nothing missing, nothing unknown,
every shape and dtype right). Malformed files are FormatErrors naming the file and the
field or tensor; valid models that use something nt lacks are NotImplementedErrors naming
the option. Only the tensors the model needs are read, from memory-mapped shards.

Supported: F32/F16/BF16/F64 weights; RoPE "default" and Llama-3's "llama3" scaling (from
rope_parameters or the older rope_theta/rope_scaling); grouped-query attention; head_dim
set apart from hidden_size; tied or untied classifiers (a written-out tied lm_head must
equal the embedding; a folder without lm_head.weight is tied whatever tie_word_embeddings
says); Qwen2's q/k/v biases; sliding windows on every layer (Mistral, Qwen2)
or on all layers but each n-th (Gemma-3 layer_types / sliding_window_pattern), Gemma-3's
local RoPE base; GPT-2 saved with or without the "transformer." prefix.
Refused: other model types; RoPE types linear, dynamic, yarn, longrope (and any other),
partial_rotary_factor != 1, different RoPE scaling on Gemma's local and global layers;
attention_bias / mlp_bias on Llama; activations other than SiLU (Llama family), tanh GELU
(Gemma, GPT-2); Gemma's query_pre_attn_scalar != head_dim, logit soft-capping,
bidirectional attention; layer_types nt's local/global pattern cannot express; GPT-2's
layer_norm_epsilon != 1e-5, n_inner != 4 * n_embd, scale_attn_by_inverse_layer_idx,
cross-attention, an untied classifier; quantization_config and any other field not known.
Not read because they do not change the function: token ids, generation settings,
initializer_range and training-time dropout (IGNORED); a multimodal gemma3's vision tower.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..io.common import FormatError, atomic_write_text, read_json
from ..io.safetensors import SafetensorsFile, float_to_bf16, save_safetensors
from . import gpt2 as gpt2_module
from . import llama as llama_module
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = "model-{i:05d}-of-{n:05d}.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000   # bytes, transformers' default "5GB"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
GPT2_EPS = 1e-5   # the layernorm epsilon of nt's GPT-2 (ops.layernorm's default, as llm.c's)
# sane limits on config.json's numbers, checked before any list or model is sized by them
# (the tensor directory then bounds every shape by the shards' real sizes)
MAX_LAYERS = 10_000
MAX_SIZE = 2 ** 40

# ====================================================================== the tables
# nt parameter, the HF tensors whose rows make it ({l}: the layer; nt stacks layers), and the
# transform from HF's layout to nt's:
#   "vocab"  HF holds the real vocabulary's rows; nt's rows past it (padding to 128) stay zero
#   "T"      GPT-2's Conv1D stores (in, out); nt's linear weight is (out, in)
#   "+1"     Gemma's RMSNorm scales by 1 + w; nt's rmsnorm scales by its weight, so nt holds 1 + w
# A parameter the model does not have (qkvb without a qkv bias, lm_head when tied) is not expected.

GPT2_TENSORS = [
    ("wte", ("transformer.wte.weight",), "vocab"),
    ("wpe", ("transformer.wpe.weight",), None),
    ("ln1w", ("transformer.h.{l}.ln_1.weight",), None),
    ("ln1b", ("transformer.h.{l}.ln_1.bias",), None),
    ("qkvw", ("transformer.h.{l}.attn.c_attn.weight",), "T"),
    ("qkvb", ("transformer.h.{l}.attn.c_attn.bias",), None),
    ("attprojw", ("transformer.h.{l}.attn.c_proj.weight",), "T"),
    ("attprojb", ("transformer.h.{l}.attn.c_proj.bias",), None),
    ("ln2w", ("transformer.h.{l}.ln_2.weight",), None),
    ("ln2b", ("transformer.h.{l}.ln_2.bias",), None),
    ("fcw", ("transformer.h.{l}.mlp.c_fc.weight",), "T"),
    ("fcb", ("transformer.h.{l}.mlp.c_fc.bias",), None),
    ("fcprojw", ("transformer.h.{l}.mlp.c_proj.weight",), "T"),
    ("fcprojb", ("transformer.h.{l}.mlp.c_proj.bias",), None),
    ("lnfw", ("transformer.ln_f.weight",), None),
    ("lnfb", ("transformer.ln_f.bias",), None),
]

_LAYER = "model.layers.{l}."
_QKV = tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv")
_QKV_BIAS = tuple(_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv")
_GATE_UP = (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight")

# llama, mistral and qwen2 (whose q, k, v projections have biases)
LLAMA_TENSORS = [
    ("wte", ("model.embed_tokens.weight",), "vocab"),
    ("attn_norm", (_LAYER + "input_layernorm.weight",), None),
    ("qkvw", _QKV, None),
    ("qkvb", _QKV_BIAS, None),
    ("attn_out", (_LAYER + "self_attn.o_proj.weight",), None),
    ("ffn_norm", (_LAYER + "post_attention_layernorm.weight",), None),   # Llama's name for the pre-MLP norm
    ("gate_up", _GATE_UP, None),
    ("down", (_LAYER + "mlp.down_proj.weight",), None),
    ("norm_f", ("model.norm.weight",), None),
    ("lm_head", ("lm_head.weight",), "vocab"),
]

GEMMA3_TENSORS = [
    ("wte", ("model.embed_tokens.weight",), "vocab"),
    ("attn_norm", (_LAYER + "input_layernorm.weight",), "+1"),
    ("qkvw", _QKV, None),
    ("q_norm", (_LAYER + "self_attn.q_norm.weight",), "+1"),
    ("k_norm", (_LAYER + "self_attn.k_norm.weight",), "+1"),
    ("attn_out", (_LAYER + "self_attn.o_proj.weight",), None),
    ("post_attn_norm", (_LAYER + "post_attention_layernorm.weight",), "+1"),   # Gemma's: after attention
    ("ffn_norm", (_LAYER + "pre_feedforward_layernorm.weight",), "+1"),
    ("gate_up", _GATE_UP, None),
    ("down", (_LAYER + "mlp.down_proj.weight",), None),
    ("post_ffn_norm", (_LAYER + "post_feedforward_layernorm.weight",), "+1"),
    ("norm_f", ("model.norm.weight",), "+1"),
    ("lm_head", ("lm_head.weight",), "vocab"),
]

# Tensors a folder may hold that are not parameters of the text model: skipped by name.
SKIPPED = {
    # the causal-mask buffers older GPT-2 checkpoints carry
    "gpt2": ("transformer.h.{l}.attn.bias", "transformer.h.{l}.attn.masked_bias"),
    # the RoPE table older Llama-family checkpoints carry
    "llama": (_LAYER + "self_attn.rotary_emb.inv_freq",),
    # multimodal Gemma-3: the vision tower and its projector (nt loads the language model)
    "gemma3": ("vision_tower.*", "multi_modal_projector.*"),
}

# Older and multimodal layouts, renamed to the tables' names before anything else.
RENAMES = {
    "gpt2": ((r"^(?!transformer\.|lm_head\.)", "transformer."),),   # saved from GPT2Model: no prefix
    "llama": (),
    "gemma3": ((r"^language_model\.model\.", "model."), (r"^model\.language_model\.", "model."),
               (r"^language_model\.lm_head\.", "lm_head."), (r"^model\.vision_tower\.", "vision_tower."),
               (r"^model\.multi_modal_projector\.", "multi_modal_projector.")),
}

# ====================================================================== config.json
# transformers' defaults (5.x config classes) for the fields a config.json may leave out

DEFAULTS = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
                 tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6, layer_types=None,
                        final_logit_softcapping=None, attn_logit_softcapping=None,
                        use_bidirectional_attention=False),
}
_ROPE_DEFAULTS = {"gpt2": None, "llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "gemma3_text": 1e6}
_GEMMA3_LOCAL_THETA = 10000.0

# Fields read by nothing because they do not change what the weights compute: metadata,
# special token ids, generation settings, initialisation and training-time dropout.
IGNORED = frozenset("""
    _name_or_path architectures model_type transformers_version dtype torch_dtype use_cache
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id initializer_range
    output_attentions output_hidden_states return_dict torchscript use_bfloat16 tf_legacy_loss pruned_heads
    id2label label2id problem_type tokenizer_class prefix finetuning_task task_specific_params
    is_encoder_decoder is_decoder tie_encoder_decoder chunk_size_feed_forward cross_attention_hidden_size
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature
    top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens cache_implementation _attn_implementation_autoset transformers.js_config
    is_llama_config attention_dropout pretraining_tp
    resid_pdrop embd_pdrop attn_pdrop gradient_checkpointing summary_type summary_use_proj summary_activation
    summary_proj_to_labels summary_first_dropout _sliding_window_pattern
""".split())

_MISSING = object()


class _Fields:
    """The fields of one config.json object, each read with its type checked, defaults as
    transformers' config class has them. `unread()` lists the fields nothing read."""

    def __init__(self, raw: dict, where: str, defaults: dict):
        self.raw, self.where, self.defaults, self.read = raw, where, defaults, set()

    def get(self, key: str, kind, nullable: bool = False):
        self.read.add(key)
        value = self.raw.get(key, self.defaults.get(key, _MISSING))
        if value is _MISSING:
            raise FormatError(f"{self.where}: missing field {key!r}")
        if value is None and nullable:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds) + (" or null" if nullable else "")
            raise FormatError(f"{self.where}: field {key!r} must be {names}, got {value!r:.80}")
        return value

    def size(self, key: str, limit: int = MAX_SIZE) -> int:
        """A positive integer (a count or a width) no larger than `limit`."""
        v = self.get(key, int)
        if not 0 < v <= limit:
            raise FormatError(f"{self.where}: field {key!r} must be in 1..{limit}, got {v}")
        return v

    def positive(self, key: str) -> float:
        """A finite positive number (an epsilon, a RoPE base)."""
        v = self.get(key, (int, float))
        if not _finite_positive(v):
            raise FormatError(f"{self.where}: field {key!r} must be a finite positive number, got {v!r:.80}")
        return float(v)

    def require(self, key: str, allowed: tuple, why: str):
        """The field's value, which nt supports only when it is one of `allowed`."""
        value = self.raw.get(key, self.defaults.get(key))
        self.read.add(key)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise NotImplementedError(f"{self.where}: {key}={value!r} is not supported: {why}")
        return value

    def unread(self) -> list[str]:
        return sorted(k for k in self.raw if k not in self.read and k not in IGNORED)


def _finite_positive(v) -> bool:
    """Whether v is a JSON number (not a bool) that is a finite positive float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:   # an int past float's range
        return False


def _unsupported(where: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"{where}: {what}")


def _gpt2_config(f: _Fields) -> GPT2Config:
    """GPT2Config from a "gpt2" config.json: nt's GPT-2 is llm.c's (tanh GELU, eps 1e-5,
    4C MLP, tied classifier), so every field that would change that is refused."""
    C = f.size("n_embd")
    T = f.size("n_positions")
    if "n_ctx" in f.raw and f.get("n_ctx", int) != T:
        raise _unsupported(f.where, f"n_ctx={f.raw['n_ctx']} differs from n_positions={T}")
    f.require("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "nt's GPT-2 uses the tanh GELU")
    eps = f.positive("layer_norm_epsilon")
    if abs(eps - GPT2_EPS) > 1e-12:
        raise _unsupported(f.where, f"layer_norm_epsilon={eps}: nt's GPT-2 uses {GPT2_EPS}")
    inner = f.get("n_inner", int, nullable=True)
    if inner is not None and inner != 4 * C:
        raise _unsupported(f.where, f"n_inner={inner}: nt's GPT-2 MLP is 4 * n_embd = {4 * C}")
    f.require("scale_attn_weights", (True,), "nt scales attention scores by 1/sqrt(head size)")
    f.require("scale_attn_by_inverse_layer_idx", (False,), "nt does not scale attention by layer")
    f.require("add_cross_attention", (False,), "nt's GPT-2 is a decoder without cross-attention")
    f.require("tie_word_embeddings", (True,), "nt's GPT-2 classifier is tied to the embedding")
    # reorder_and_upcast_attn changes only where fp16 rounding happens: the same function in fp32
    f.get("reorder_and_upcast_attn", bool)
    try:
        return GPT2Config(block_size=T, vocab_size=f.size("vocab_size"), n_layer=f.size("n_layer", MAX_LAYERS),
                          n_head=f.size("n_head"), n_embd=C)
    except ValueError as e:
        raise FormatError(f"{f.where}: describes an impossible model: {e}") from None


def _rope_dict(params: dict, where: str, max_positions: int) -> tuple[float, Optional[tuple]]:
    """(theta, nt rope_scaling) from one RoPE parameter dict: "default" or Llama-3's "llama3"."""
    if not isinstance(params, dict):
        raise FormatError(f"{where} must be an object, got {params!r:.80}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if not _finite_positive(theta):
        raise FormatError(f"{where}: rope_theta must be a finite positive number, got {theta!r:.80}")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise _unsupported(where, f"partial_rotary_factor={partial!r}: nt rotates every channel of a head")
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if kind == "default":
        scaling = None
    elif kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        known |= set(keys)
        values = {k: params.get(k, max_positions if k == "original_max_position_embeddings" else None) for k in keys}
        for k, v in values.items():
            if not _finite_positive(v):
                raise FormatError(f"{where}: llama3 RoPE needs a positive number {k}, got {v!r:.80}")
        if not values["low_freq_factor"] < values["high_freq_factor"]:
            raise FormatError(f"{where}: llama3 RoPE needs low_freq_factor < high_freq_factor, got {values}")
        scaling = tuple(float(values[k]) for k in keys)
    else:
        raise _unsupported(where, f"rope_type {kind!r}: nt implements 'default' and Llama-3's 'llama3'")
    extra = sorted(set(params) - known)
    if extra:
        raise _unsupported(where, f"RoPE fields {extra} (rope_type {kind!r}) are not supported")
    return float(theta), scaling


def _rope(f: _Fields, arch: str, max_positions: int, layer_kinds: set) -> tuple[float, Optional[tuple], float]:
    """(rope_theta, rope_scaling, rope_local_theta) from transformers 5's rope_parameters or
    the older rope_theta / rope_scaling (/ Gemma's rope_local_base_freq) fields, with
    transformers' precedence: rope_scaling overrides rope_parameters, rope_theta fills in."""
    params = f.get("rope_parameters", dict, nullable=True) if "rope_parameters" in f.raw else None
    scaling = f.get("rope_scaling", dict, nullable=True) if "rope_scaling" in f.raw else None
    theta = f.positive("rope_theta") if "rope_theta" in f.raw else _ROPE_DEFAULTS[arch]
    where = f"{f.where}: rope_parameters"
    if arch != "gemma3_text":
        merged = dict(scaling or params or {})
        merged.setdefault("rope_theta", theta)
        theta, rope_scaling = _rope_dict(merged, where, max_positions)
        return theta, rope_scaling, 0.0
    # Gemma-3: one dict per layer type; the local layers' base defaults to rope_local_base_freq
    local_theta = f.positive("rope_local_base_freq") if "rope_local_base_freq" in f.raw else _GEMMA3_LOCAL_THETA
    params = dict(params or {})
    extra = sorted(set(params) - {"full_attention", "sliding_attention"})
    if extra:
        raise FormatError(f"{where}: Gemma-3 keeps one dict per layer type, got keys {extra}")
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    if not isinstance(full, dict) or not isinstance(local, dict):
        raise FormatError(f"{where}: full_attention and sliding_attention must be objects")
    full = {"rope_theta": theta, **full, **(scaling or {})}
    local = {"rope_theta": local_theta, **local}
    theta, rope_scaling = _rope_dict(full, where + ".full_attention", max_positions)
    local_theta, local_scaling = _rope_dict(local, where + ".sliding_attention", max_positions)
    if layer_kinds == {"sliding_attention", "full_attention"} and local_scaling != rope_scaling:
        raise _unsupported(where, f"RoPE scaling {rope_scaling} on global layers and {local_scaling} on local "
                                  "layers: nt applies one scaling to every layer")
    if layer_kinds == {"sliding_attention"}:
        return local_theta, local_scaling, 0.0
    return theta, rope_scaling, local_theta


def _layer_types(f: _Fields, arch: str, L: int) -> tuple[list[str], Optional[int]]:
    """(each layer's attention kind, the sliding window or None), from layer_types or the
    fields transformers derives it from."""
    if arch == "llama":
        return ["full_attention"] * L, None
    if arch == "mistral":   # MistralModel applies its sliding_window (when set) to every layer
        window = f.get("sliding_window", int, nullable=True)
        return ["full_attention" if window is None else "sliding_attention"] * L, window
    if arch == "qwen2":
        window = f.get("sliding_window", int, nullable=True)
        if not f.get("use_sliding_window", bool):
            window = None
        first_local = f.get("max_window_layers", int)
        derived = ["sliding_attention" if window is not None and i >= first_local else "full_attention"
                   for i in range(L)]
    else:   # gemma3_text: five local layers then a global one, unless layer_types says otherwise
        window = f.get("sliding_window", int, nullable=True)
        pattern = f.size("sliding_window_pattern")
        derived = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    types = f.get("layer_types", list, nullable=True)
    if types is None:
        types = derived
    if len(types) != L or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise _unsupported(f.where, f"layer_types {types!r:.200}: nt needs {L} entries of 'full_attention' "
                                    "or 'sliding_attention'")
    if window is None:   # transformers: a sliding layer without a window attends to everything
        return ["full_attention"] * L, None
    return list(types), window


def _sliding_pattern(where: str, types: list[str], window: Optional[int]) -> tuple[int, int]:
    """nt's (sliding_window, global_every) reproducing the layers' kinds: every layer local,
    or local except every n-th (Gemma-3's pattern); anything else is refused."""
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return 0, 0
    if window is None or window <= 0:
        raise FormatError(f"{where}: sliding_window must be a positive integer for sliding layers, got {window!r}")
    if all(local):
        return window, 0
    every = local.index(False) + 1
    if local != [(l + 1) % every != 0 for l in range(len(local))]:
        raise _unsupported(where, f"layer_types {types}: nt's local layers follow one pattern, every layer local "
                                  "but each n-th")
    return window, every


def _llama_config(f: _Fields, arch: str) -> LlamaConfig:
    """LlamaConfig from a llama, mistral, qwen2 or gemma3_text config.json."""
    gemma = arch == "gemma3_text"
    L, C, NH = f.size("num_hidden_layers", MAX_LAYERS), f.size("hidden_size"), f.size("num_attention_heads")
    NKV = f.size("num_key_value_heads") if f.get("num_key_value_heads", int, nullable=True) is not None else NH
    hs = f.size("head_dim") if f.get("head_dim", int, nullable=True) is not None else C // NH
    if hs * NH != C and f.raw.get("head_dim") is None:
        raise FormatError(f"{f.where}: hidden_size {C} is not divisible by num_attention_heads {NH} "
                          "and there is no head_dim")
    T = f.size("max_position_embeddings")
    if gemma:
        f.require("hidden_activation", ("gelu_pytorch_tanh", "gelu_new"), "nt's GeGLU gates with the tanh GELU")
        scalar = f.get("query_pre_attn_scalar", (int, float))
        if scalar != hs:
            raise _unsupported(f.where, f"query_pre_attn_scalar={scalar}: nt scales attention scores by "
                                        f"1/sqrt(head_dim) = 1/sqrt({hs})")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            cap = f.get(key, (int, float), nullable=True)
            if cap is not None:
                raise _unsupported(f.where, f"{key}={cap}: nt has no soft-capping")
        f.require("use_bidirectional_attention", (False,), "nt's attention is causal")
        f.require("attention_bias", (False,), "nt's Gemma has no attention biases")
        f.read.add("hidden_act")   # older Gemma configs repeat it; the model reads hidden_activation
    else:
        f.require("hidden_act", ("silu", "swish"), "nt's SwiGLU gates with SiLU")
    if arch == "llama":
        f.require("attention_bias", (False,), "nt's Llama has no biases on q, k, v and o projections")
        f.require("mlp_bias", (False,), "nt's Llama MLP has no biases")
    if f.raw.get("rope_interleaved", False) is not False:
        raise _unsupported(f.where, "rope_interleaved: transformers' Llama rotates the two halves of a head")
    f.read.add("rope_interleaved")
    types, window = _layer_types(f, arch, L)
    sliding_window, global_every = _sliding_pattern(f.where, types, window)
    theta, scaling, local_theta = _rope(f, arch, T, set(types))
    options = dict(ffn_kind="geglu", qk_norm=True, post_norms=True, embed_scale=True) if gemma else {}
    try:
        return LlamaConfig(
            dim=C, n_layers=L, n_heads=NH, n_kv_heads=NKV, ffn_hidden=f.size("intermediate_size"),
            vocab_size=f.size("vocab_size"), block_size=T, head_dim=hs, norm_eps=f.positive("rms_norm_eps"),
            rope_theta=theta, rope_pairing="half", rope_scaling=scaling, rope_local_theta=local_theta,
            tie_embeddings=f.get("tie_word_embeddings", bool), qkv_bias=arch == "qwen2",
            sliding_window=sliding_window, global_every=global_every, **options)
    except ValueError as e:
        raise FormatError(f"{f.where}: describes an impossible model: {e}") from None


def read_config(folder) -> tuple[str, Union[GPT2Config, LlamaConfig]]:
    """(architecture, nt config) of a Hugging Face model folder's config.json: the
    architecture is "gpt2", "llama" (llama, mistral, qwen2) or "gemma3" (gemma3_text, and
    the text model of a multimodal gemma3). Every field is checked; one that nt does not
    read and that is not known to be harmless (IGNORED) is refused."""
    path = Path(folder) / CONFIG
    raw = read_json(path, max_bytes=16 * 1024 * 1024, what="a Hugging Face model folder has config.json")
    where = str(path)
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    top = raw
    if model_type == "gemma3":   # multimodal: the language model is text_config; the rest is vision
        raw = raw.get("text_config")
        where += ": text_config"
        if not isinstance(raw, dict):
            raise FormatError(f"{where}: must be a JSON object, got {raw!r:.80}")
        if raw.get("model_type", "gemma3_text") != "gemma3_text":
            raise FormatError(f"{where}: model_type must be 'gemma3_text', got {raw.get('model_type')!r:.80}")
        raw = {"tie_word_embeddings": top.get("tie_word_embeddings", True), **raw, "model_type": "gemma3_text"}
    kind = raw.get("model_type")
    if not isinstance(kind, str) or kind not in DEFAULTS:
        raise NotImplementedError(f"{where}: model_type {kind!r:.80} is not supported "
                                  f"(nt reads {', '.join(sorted(DEFAULTS))} and gemma3)")
    f = _Fields(raw, where, DEFAULTS[kind])
    config = _gpt2_config(f) if kind == "gpt2" else _llama_config(f, kind)
    unread = f.unread()
    if unread:
        raise NotImplementedError(f"{where}: fields {unread} are not understood by nt's {kind} loader; "
                                  "refusing rather than ignoring them")
    return {"gpt2": "gpt2", "gemma3_text": "gemma3"}.get(kind, "llama"), config


# ====================================================================== the tensor directory

@dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: rows row0..row1 of nt parameter `param` (of layer `layer`
    for stacked parameters), with the table's transform; `shape` is the HF tensor's."""
    param: str
    layer: Optional[int]
    row0: int
    row1: int
    shape: tuple
    transform: Optional[str]


def _table(config) -> list:
    """The architecture's table (a Llama config is Gemma-3's when it has post-norms: both
    read_config and save_pretrained admit no other mix of the Gemma options)."""
    if isinstance(config, GPT2Config):
        return GPT2_TENSORS
    return GEMMA3_TENSORS if config.post_norms else LLAMA_TENSORS


def _layout(config) -> dict[str, tuple]:
    if isinstance(config, GPT2Config):
        return {name: shape for name, shape, _ in gpt2_module.param_layout(config)}
    return {name: shape for name, shape, _ in llama_module.param_layout(config)}


def _row_splits(config) -> dict[str, tuple]:
    """Rows each HF tensor contributes to a fused nt parameter, in the table's order."""
    if isinstance(config, GPT2Config):
        return {}
    q, kv = config.n_heads * config.hs, config.n_kv_heads * config.hs
    return {"qkvw": (q, kv, kv), "qkvb": (q, kv, kv), "gate_up": (config.ffn_hidden,) * 2}


def slots(config) -> dict[str, Slot]:
    """HF tensor name -> Slot, for every HF tensor a model of `config` is made of."""
    layout, splits = _layout(config), _row_splits(config)
    n_layers = config.n_layer if isinstance(config, GPT2Config) else config.n_layers
    out = {}
    for param, names, transform in _table(config):
        if param not in layout:
            continue
        layered = "{l}" in names[0]
        shape = layout[param][1:] if layered else layout[param]
        rows = splits.get(param, (shape[0],))
        if transform == "vocab":
            rows = (config.vocab_size,)
        for l in range(n_layers) if layered else [None]:
            row0 = 0
            for name, n in zip(names, rows):
                part = (n,) + tuple(shape[1:])
                hf_shape = part[::-1] if transform == "T" else part
                out[name.format(l=l)] = Slot(param, l, row0, row0 + n, hf_shape, transform)
                row0 += n
    return out


def _pattern(name: str) -> re.Pattern:
    """A table name as a regex: {l} is a layer number, * any suffix."""
    return re.compile(re.escape(name).replace(r"\{l\}", r"\d+").replace(r"\*", ".*") + "$")


def _safe_shard_name(folder: Path, name, where: str) -> Path:
    """A shard's file name from an index: a plain name inside the folder, never a path."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).name != name:
        raise FormatError(f"{where}: shard {name!r:.120} is not a plain file name inside the model folder")
    return folder / name


def open_weights(folder) -> tuple[dict[str, tuple[SafetensorsFile, str]], Path]:
    """(HF tensor name -> (its shard, opened and header-validated, memory-mapped; the name),
    the file that lists them): model.safetensors, or the shards an index lists. Index
    entries must be plain file names in the folder, each listed tensor must be in its shard
    and every tensor of a shard must be listed there."""
    folder = Path(folder)
    if (folder / SINGLE).is_file():
        f = _open(folder / SINGLE)
        return {name: (f, name) for name in f.tensors}, f.path
    index_path = folder / INDEX
    if not index_path.exists():
        raise FormatError(f"{folder}: no {SINGLE} and no {INDEX}: not a safetensors model folder")
    index = read_json(index_path, max_bytes=64 * 1024 * 1024)
    where = str(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{where}: needs a non-empty object 'weight_map' (tensor name -> shard file)")
    shards: dict[str, SafetensorsFile] = {}
    for name, file in weight_map.items():
        path = _safe_shard_name(folder, file, where)
        if file not in shards:
            if not path.is_file():
                raise FormatError(f"{where}: tensor {name!r} is in shard {file!r}, which is missing from {folder}")
            shards[file] = _open(path)
        if name not in shards[file].tensors:
            raise FormatError(f"{where}: tensor {name!r} is listed in {file!r}, which does not hold it")
    for file, f in shards.items():
        for name in f.tensors:
            if weight_map.get(name) != file:
                raise FormatError(f"{f.path}: tensor {name!r} is not listed for this shard in {INDEX}")
    return {name: (shards[file], name) for name, file in weight_map.items()}, index_path


def _open(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None


def _renamed(arch: str, tensors: dict) -> dict:
    """The tensors under the tables' names (RENAMES: older and multimodal layouts)."""
    renamed = {}
    for name, entry in tensors.items():
        canonical = name
        for pattern, repl in RENAMES[arch]:
            canonical = re.sub(pattern, repl, canonical)
        if canonical in renamed:
            raise FormatError(f"{entry[0].path}: tensor {name!r} duplicates {canonical!r}")
        renamed[canonical] = entry
    return renamed


def _check_directory(arch: str, config, renamed: dict, source: Path) -> dict[str, Slot]:
    """The slots to fill: every expected tensor is present with its shape and a float
    dtype; nothing else is, but the SKIPPED buffers and a tied lm_head."""
    expected = slots(config)
    skipped = [_pattern(p) for p in SKIPPED[arch]]
    tied = not isinstance(config, LlamaConfig) or config.tie_embeddings
    for name, (f, original) in renamed.items():
        if name in expected or any(p.match(name) for p in skipped):
            continue
        if tied and name == "lm_head.weight":
            continue   # checked to equal the embedding when it is read
        raise FormatError(f"{f.path}: tensor {original!r} is not part of nt's {arch} model of this config"
                          f"{_at(f, original)}")
    for name, slot in expected.items():
        if name not in renamed:
            raise FormatError(f"{source}: missing tensor {name!r} (a {arch} model of this config.json has it)")
        f, original = renamed[name]
        info = f.tensors[original]
        if info.shape != slot.shape:
            raise FormatError(f"{f.path}: tensor {original!r} has shape {info.shape}, config.json makes it "
                              f"{slot.shape}{_at(f, original)}")
        if info.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{f.path}: tensor {original!r} is {info.dtype}; nt loads {', '.join(FLOAT_DTYPES)}"
                              f"{_at(f, original)}")
    return expected


def _at(f: SafetensorsFile, name: str) -> str:
    """Where tensor `name`'s data starts in its file, for error messages."""
    return f" (data at byte {f.data_offset + f.tensors[name].begin})"


def _read(f: SafetensorsFile, name: str, dtype, check_finite: bool) -> np.ndarray:
    values = f.read(name, dtype)
    if check_finite and not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise FormatError(f"{f.path}: tensor {name!r} holds {bad} non-finite values (NaN or inf){_at(f, name)}")
    return values


# ====================================================================== load

def from_pretrained(path, device: str = "cpu", dtype=np.float32, check_finite: bool = False) -> Union[GPT2, Llama]:
    """A GPT2 or Llama from a Hugging Face model folder (see the module docstring for the
    model types). The weights (F32, F16, BF16 or F64) are converted to `dtype`.
    check_finite=True refuses a tensor holding NaN or inf, naming it.

    Raises FormatError for a malformed folder (a missing config.json or tensor, a corrupt
    shard, an index naming a missing shard or a path, a wrong shape, an unknown tensor) and
    NotImplementedError for a model nt cannot run as transformers does (an unsupported
    model_type, RoPE type, activation, soft-capping, ...), naming the file and field."""
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder (a Hugging Face model is a folder with {CONFIG})")
    arch, config = read_config(folder)
    tensors, source = open_weights(folder)
    n_layers = config.n_layer if isinstance(config, GPT2Config) else config.n_layers
    if n_layers > len(tensors):   # each layer has several tensors: refuse before listing them
        raise FormatError(f"{source}: config.json's {n_layers} layers need more tensors than the {len(tensors)} "
                          "the folder holds")
    renamed = _renamed(arch, tensors)
    if isinstance(config, LlamaConfig) and "lm_head.weight" not in renamed:
        config.tie_embeddings = True   # no classifier of its own: the embedding is it
    expected = _check_directory(arch, config, renamed, source)
    layout = _layout(config)
    model = (GPT2 if isinstance(config, GPT2Config) else Llama)(config, device=device, dtype=dtype, seed=None)
    params = model.params
    host = np.zeros(params.numel, dtype=params.dtype)
    for name, slot in expected.items():
        f, original = renamed[name]
        values = _read(f, original, params.dtype, check_finite)
        if slot.transform == "T":
            values = values.T
        elif slot.transform == "+1":
            values = values + 1
        o = params.offsets[slot.param]
        view = host[o:o + math.prod(layout[slot.param])].reshape(layout[slot.param])
        target = view if slot.layer is None else view[slot.layer]
        target[slot.row0:slot.row1] = values
    head = renamed.get("lm_head.weight")
    if head is not None and "lm_head.weight" not in expected:   # tied: it must be the embedding
        embedding = next(n for n, s in expected.items() if s.param == "wte")
        same = head[0].tensors[head[1]].shape == expected[embedding].shape and np.array_equal(
            _read(*head, params.dtype, check_finite), _read(*renamed[embedding], params.dtype, False))
        if not same:
            raise NotImplementedError(f"{head[0].path}: tensor 'lm_head.weight' differs from {embedding!r}, but "
                                      "nt's model of this config ties the classifier to the embedding")
    params.load_flat(host)
    return model


# ====================================================================== save

def _export_config(model, dtype: str) -> dict:
    """config.json for `model` saved in `dtype`, or NotImplementedError naming what HF's
    classes cannot express."""
    cfg = model.config
    if getattr(model, "adapters", None) is not None:
        raise NotImplementedError(f"{type(model).__name__}: LoRA adapters are attached; merge or detach them "
                                  "first (save_pretrained writes the base weights only)")
    meta = {"dtype": dtype, "torch_dtype": dtype, "bos_token_id": None, "eos_token_id": None,
            "pad_token_id": None, "use_cache": True}
    if isinstance(cfg, GPT2Config):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": GPT2_EPS,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "add_cross_attention": False, "tie_word_embeddings": True, **meta}
    where = f"{type(model).__name__} config"
    if getattr(model, "quantized", None):
        raise NotImplementedError(f"{where}: matrices kept quantised ({sorted(model.quantized)}) have no "
                                  "safetensors form; load the model in float to save it")
    if cfg.n_predict > 1:
        raise NotImplementedError(f"{where}: n_predict={cfg.n_predict}: transformers' models have no "
                                  "multi-token prediction heads")
    if cfg.norm != "rmsnorm":
        raise NotImplementedError(f"{where}: norm={cfg.norm!r}: the HF Llama family uses RMSNorm")
    if cfg.rope_pairing != "half":
        raise NotImplementedError(f"{where}: rope_pairing={cfg.rope_pairing!r}: transformers rotates halves")
    gemma = dict(ffn_kind="geglu", qk_norm=True, post_norms=True, embed_scale=True, qkv_bias=False)
    plain = dict(ffn_kind="swiglu", qk_norm=False, post_norms=False, embed_scale=False)
    is_gemma = all(getattr(cfg, k) == v for k, v in gemma.items())
    if not is_gemma and not all(getattr(cfg, k) == v for k, v in plain.items()):
        options = {k: getattr(cfg, k) for k in list(gemma)}
        raise NotImplementedError(f"{where}: {options} is neither Gemma-3 ({gemma}) nor the Llama/Mistral/Qwen2 "
                                  f"block ({plain}, with or without qkv_bias)")
    types = ["sliding_attention" if cfg.is_local(l) else "full_attention" for l in range(cfg.n_layers)]
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    if not is_gemma and "sliding_attention" in types and local_theta != cfg.rope_theta:
        raise NotImplementedError(f"{where}: rope_local_theta={cfg.rope_local_theta}: only Gemma-3 has a "
                                  "separate RoPE base for local layers")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": int(original)}
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hs, "max_position_embeddings": cfg.block_size,
              "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
              "initializer_range": cfg.init_std, **meta}
    if is_gemma:
        local_rope = {**rope, "rope_theta": local_theta}
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
                "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": cfg.hs,
                "sliding_window": cfg.sliding_window or None, "layer_types": types,
                "rope_parameters": {"full_attention": rope, "sliding_attention": local_rope},
                "attention_bias": False, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                "use_bidirectional_attention": False}
    common.update(hidden_act="silu", rope_parameters=rope)
    if cfg.qkv_bias:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                "use_sliding_window": bool(cfg.sliding_window), "sliding_window": cfg.sliding_window or None,
                "max_window_layers": types.index("sliding_attention") if cfg.sliding_window else cfg.n_layers,
                "layer_types": types}
    if "sliding_attention" not in types:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "attention_bias": False, "mlp_bias": False}
    if "full_attention" in types:
        raise NotImplementedError(f"{where}: global_every={cfg.global_every} with sliding_window: transformers' "
                                  "Mistral slides every layer (mixed layers need qkv_bias as Qwen2, or Gemma-3)")
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **common,
            "sliding_window": cfg.sliding_window}


def _export_tensors(model) -> dict[str, np.ndarray]:
    """HF tensor name -> array in HF's layout (the tables' transforms undone)."""
    cfg, params = model.config, model.params
    flat, layout = params.to_flat(), _layout(cfg)
    out = {}
    for name, slot in slots(cfg).items():
        o = params.offsets[slot.param]
        view = flat[o:o + math.prod(layout[slot.param])].reshape(layout[slot.param])
        values = (view if slot.layer is None else view[slot.layer])[slot.row0:slot.row1]
        if slot.transform == "T":
            values = values.T
        elif slot.transform == "+1":
            values = values - 1
        out[name] = np.ascontiguousarray(values)
    return out


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB" (transformers' units:
    KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        units = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
                 "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
        if not isinstance(size, str) or m is None:
            raise ValueError(f"max_shard_size must be bytes or a size like '5GB' or '500MiB', got {size!r}")
        value = int(float(m.group(1)) * units[m.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Tensors in order, cut into shards of at most max_bytes (a bigger tensor alone in one)."""
    shards, size = [{}], 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    return shards


SAVE_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _convert(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The tensors in `dtype` (bfloat16: uint16 bit patterns); a finite value that the
    narrower type cannot hold is a ValueError naming the tensor, not a silent inf."""
    out = {}
    for name, a in tensors.items():
        if dtype == "bfloat16":
            out[name] = float_to_bf16(a)
            wide = (out[name].astype(np.uint32) << 16).view(np.float32)
        else:
            with np.errstate(over="ignore"):   # overflow is detected just below
                out[name] = wide = a.astype(dtype)
        if not np.array_equal(np.isfinite(wide), np.isfinite(a)):
            raise ValueError(f"tensor {name!r} has values beyond {dtype}'s range; save it in a wider dtype")
    return out


def save_pretrained(model, path, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
                    dtype=None) -> None:
    """Write `model` as a Hugging Face model folder that transformers' AutoModelForCausalLM
    loads: config.json and the weights in model.safetensors, or in shards of at most
    max_shard_size bytes plus model.safetensors.index.json. dtype: "float32", "float16",
    "bfloat16" or "float64" (or NumPy's float types; rounded to nearest); None keeps the model's.

    Every file is written atomically (temp file, fsync, rename); the weight files of an
    earlier save into the same folder that this one does not use are removed, other files
    (a tokenizer's) are kept. config.json is written last. A model HF's classes cannot
    express raises NotImplementedError before anything is written."""
    folder = Path(path)
    if dtype is None:
        dtype = np.dtype(model.params.dtype).name
    elif not isinstance(dtype, str) and dtype in (np.float64, np.float32, np.float16):
        dtype = np.dtype(dtype).name
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save_pretrained: dtype must be one of {SAVE_DTYPES} or None, got {dtype!r}")
    config = _export_config(model, dtype)
    shards = _shards(_convert(_export_tensors(model), dtype), parse_size(max_shard_size))
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}   # transformers refuses safetensors files without it
    if len(shards) == 1:
        written = {SINGLE}
        save_safetensors(folder / SINGLE, shards[0], metadata, bf16=shards[0] if dtype == "bfloat16" else ())
    else:
        names = [SHARD.format(i=i + 1, n=len(shards)) for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_safetensors(folder / name, shard, metadata, bf16=shard if dtype == "bfloat16" else ())
        weight_map = {t: name for name, shard in zip(names, shards) for t in shard}
        total = sum(a.nbytes for shard in shards for a in shard.values())
        atomic_write_text(folder / INDEX, _json({"metadata": {"total_size": total}, "weight_map": weight_map}))
        written = set(names) | {INDEX}
    for old in folder.iterdir():   # weight files of an earlier save, which would shadow this one
        if old.name not in written and (old.name in (SINGLE, INDEX) or re.fullmatch(
                r"model-\d{5}-of-\d{5}\.safetensors", old.name)):
            old.unlink()
    atomic_write_text(folder / CONFIG, _json(config))


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
