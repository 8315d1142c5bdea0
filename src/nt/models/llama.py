"""The LLaMA family as one configurable model: LLaMA-2/3, Qwen2, SmolLM2, Gemma-3 shapes.

A block is pre-norm attention then a pre-norm gated MLP, each added to the residual:
    h = norm(x) -> fused qkv linear (+bias: Qwen2) -> [qk_norm: Qwen3/Gemma-3] -> RoPE
      -> causal grouped-query attention (sliding window on local layers) -> out linear
      -> [post norm: Gemma-3] -> dropout -> x += h
    h = norm(x) -> fused gate_up linear (2H, C) -> SwiGLU / GeGLU -> down linear (C, H)
      -> [post norm: Gemma-3] -> dropout -> x += h
then a final norm and the classifier (tied to the embedding or its own lm_head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numba
import numpy as np

from .. import bitnet, ops
from ..tape import Tape
from ..tensor import Arena, Params, Tensor
from .base import LanguageModel

FFN_ACTS = {"swiglu": "silu", "geglu": "gelu_tanh"}


@dataclass
class LlamaConfig:
    """Shape and options of a LLaMA-family model. Sizes: C = dim, NH heads of head_dim
    (default dim / n_heads), NKV key/value heads, H = ffn_hidden."""

    dim: int = 256                  # C, the residual width
    n_layers: int = 4               # L
    n_heads: int = 4                # NH, query heads
    n_kv_heads: int = 2             # NKV, key/value heads (NH % NKV == 0: grouped-query)
    ffn_hidden: int = 768           # H, the MLP's inner width
    vocab_size: int = 256           # V, the real vocabulary (padded to 128 for the matrices)
    block_size: int = 1024          # maximum sequence length (RoPE has no table: a check only)
    head_dim: int = 0               # hs; 0 = dim // n_heads (Gemma-3 sets it explicitly)
    ffn_kind: str = "swiglu"        # "swiglu" (silu gate) or "geglu" (tanh-GELU gate, Gemma)
    norm: str = "rmsnorm"           # "rmsnorm" or "layernorm" (weight only, no bias)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_pairing: str = "half"      # "half" (HF checkpoints) or "interleaved" (Meta / llama.cpp LLAMA)
    rope_scaling: Optional[tuple] = None  # Llama-3: (factor, low_freq_factor, high_freq_factor, original_context)
    tie_embeddings: bool = True     # classifier = embedding matrix (no lm_head)
    qkv_bias: bool = False          # biases on the qkv projection (Qwen2)
    qk_norm: bool = False           # RMSNorm over each q and k head (Qwen3, Gemma-3)
    post_norms: bool = False        # extra norm after attention and after the MLP (Gemma-2/3)
    embed_scale: bool = False       # multiply embeddings by sqrt(dim) (Gemma)
    sliding_window: int = 0         # > 0: local layers see only the last `sliding_window` positions
    global_every: int = 0           # with sliding_window: every n-th layer is global (Gemma-3: 6)
    rope_local_theta: float = 0.0   # RoPE base of local layers (Gemma-3: 10000); 0 = rope_theta
    dropout: float = 0.0            # on the attention and MLP outputs, in training mode
    n_predict: int = 1              # multi-token prediction: heads for tokens t+1..t+n_predict
    label_smoothing: float = 0.0    # of the training loss (PyTorch's definition)
    z_loss: float = 0.0             # coefficient of logsumexp^2 in the loss (PaLM)
    init_std: float = 0.02
    bitnet: bool = False            # BitNet b1.58: block projections are BitLinear (ternary, nt.bitnet)

    # fields added after checkpoints were written: absent, they take their default
    ADDED_FIELDS = ("bitnet",)

    PRESETS = {
        # laptop sizes
        "llama-tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, block_size=64),
        "llama-mini": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=768, block_size=256),
        "llama-50m": dict(dim=768, n_layers=8, n_heads=12, n_kv_heads=4, ffn_hidden=2048, block_size=256),
        # published small models (shapes as in their released configs)
        "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                             vocab_size=49152, block_size=8192, rope_theta=100000.0),
        "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_hidden=2560,
                             vocab_size=49152, block_size=8192, rope_theta=100000.0),
        "qwen2-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_hidden=4864,
                           vocab_size=151936, block_size=32768, rope_theta=1000000.0, norm_eps=1e-6,
                           qkv_bias=True),
        "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                            vocab_size=128256, block_size=131072, rope_theta=500000.0,
                            rope_scaling=(32.0, 1.0, 4.0, 8192)),
        "gemma3-270m": dict(dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, ffn_hidden=2048,
                            vocab_size=262144, block_size=32768, ffn_kind="geglu", norm_eps=1e-6,
                            rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512,
                            global_every=6, qk_norm=True, post_norms=True, embed_scale=True),
    }

    def __post_init__(self):
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "block_size",
                      "n_predict"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"LlamaConfig.{field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim == 0 and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        if self.hs % 2:
            raise ValueError(f"head_dim {self.hs} must be even for RoPE")
        if self.ffn_kind not in FFN_ACTS:
            raise ValueError(f"ffn_kind must be one of {sorted(FFN_ACTS)}, got {self.ffn_kind!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.rope_pairing not in ops.ROPE_PAIRINGS:
            raise ValueError(f"rope_pairing must be one of {ops.ROPE_PAIRINGS}, got {self.rope_pairing!r}")
        for field in ("rope_theta", "norm_eps", "init_std"):  # NaN fails these comparisons too
            if not 0.0 < float(getattr(self, field)) < math.inf:
                raise ValueError(f"LlamaConfig.{field} must be a positive finite number, got {getattr(self, field)}")
        if self.rope_local_theta and not 0.0 < float(self.rope_local_theta) < math.inf:
            raise ValueError(f"LlamaConfig.rope_local_theta must be 0 (same as rope_theta) or positive, "
                             f"got {self.rope_local_theta}")
        if self.rope_scaling is not None:
            self.rope_scaling = tuple(float(v) for v in self.rope_scaling)
            ops.rope_frequencies(self.hs, self.rope_theta, self.rope_scaling)  # validates it
        if not 0.0 <= self.dropout < 1.0 or self.sliding_window < 0 or self.global_every < 0:
            raise ValueError("need 0 <= dropout < 1, sliding_window >= 0, global_every >= 0")
        if self.bitnet and self.qkv_bias:
            raise ValueError("bitnet=True has no projection biases (BitLinear): set qkv_bias=False")

    @property
    def hs(self) -> int:
        """Head size."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def qkv_width(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.hs

    @property
    def padded_vocab_size(self) -> int:
        return (self.vocab_size + 127) // 128 * 128

    def is_local(self, layer: int) -> bool:
        """Whether `layer` uses the sliding window (Gemma-3: five local layers, then a global one)."""
        if self.sliding_window == 0:
            return False
        return not (self.global_every and (layer + 1) % self.global_every == 0)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A named shape (see PRESETS) with overrides, e.g. preset('llama-mini', vocab_size=256)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


# matrices a model may keep in a ggml block format (inference only, see Llama(quantized=...))
QUANTIZABLE = ("qkvw", "attn_out", "gate_up", "down", "lm_head")


def param_layout(cfg: LlamaConfig, quantized=()) -> list[tuple[str, tuple, bool]]:
    """(name, shape, weight-decay?) in storage order; per-layer tensors are stacked (L, ...).
    Names in `quantized` are left out (their weights live outside the parameter buffer)."""
    Vp, L, C, H, hs, W = cfg.padded_vocab_size, cfg.n_layers, cfg.dim, cfg.ffn_hidden, cfg.hs, cfg.qkv_width
    layout = [("wte", (Vp, C), True), ("attn_norm", (L, C), False), ("qkvw", (L, W, C), True)]
    if cfg.qkv_bias:
        layout.append(("qkvb", (L, W), False))
    if cfg.qk_norm:
        layout += [("q_norm", (L, hs), False), ("k_norm", (L, hs), False)]
    if cfg.bitnet:   # BitNet's sub-layer norms before the output projections (SubLN)
        layout.append(("attn_sub_norm", (L, cfg.n_heads * hs), False))
    layout.append(("attn_out", (L, C, cfg.n_heads * hs), True))
    if cfg.post_norms:
        layout.append(("post_attn_norm", (L, C), False))
    layout += [("ffn_norm", (L, C), False), ("gate_up", (L, 2 * H, C), True)]
    if cfg.bitnet:
        layout.append(("ffn_sub_norm", (L, H), False))
    layout.append(("down", (L, C, H), True))
    if cfg.post_norms:
        layout.append(("post_ffn_norm", (L, C), False))
    layout.append(("norm_f", (C,), False))
    if not cfg.tie_embeddings:
        layout.append(("lm_head", (Vp, C), True))
    if cfg.n_predict > 1:
        layout.append(("mtp", (cfg.n_predict - 1, C, C), True))
    return [entry for entry in layout if entry[0] not in quantized]


def multi_token_targets(targets: np.ndarray, k: int) -> np.ndarray:
    """Targets of the head predicting k tokens further than the next one: position t gets
    targets[t + k] (the token t + 1 + k), and -1 (ignored) where that is past the end."""
    shifted = np.full_like(targets, -1)
    if k < targets.shape[1]:
        shifted[:, :targets.shape[1] - k] = targets[:, k:]
    return shifted


class Llama(LanguageModel):
    """A LLaMA-family decoder on nt's tape; the same interface as GPT2.

    >>> model = Llama(LlamaConfig.preset("llama-mini", vocab_size=256))
    >>> logits, loss = model(idx, targets)
    >>> model.zero_grad(); model.backward()
    """

    def __init__(self, config: LlamaConfig, device: str = "cpu", dtype=np.float32, seed: Optional[int] = 0,
                 quantized: Optional[dict[str, str]] = None):
        """quantized: {matrix name: "Q8_0" | "Q4_0"} for matrices (of QUANTIZABLE) kept as ggml
        blocks for inference: they are left out of `params` and read by ops.linear_q from
        `qweights[name]` (a list of (OC, bytes) uint8 rows per layer; lm_head: one array),
        which the caller fills (nt.models.gguf.load(..., keep_quantized=True) does).
        A BitNet model (config.bitnet) may also keep its projections as "T2" ternary rows,
        read by nt.bitnet.linear_t2 (nt.bitnet.pack makes such a model)."""
        self.config = config
        self.quantized = dict(quantized or {})
        formats = set(ops.QUANT_FORMATS) | ({"T2"} if config.bitnet else set())
        bad = [n for n, kind in self.quantized.items() if n not in QUANTIZABLE or kind not in formats]
        if bad or (self.quantized and (config.qkv_bias or dtype != np.float32)):
            raise ValueError(f"cannot quantise {bad or 'with qkv_bias / non-float32'}: names must be among "
                             f"{QUANTIZABLE}, formats among {sorted(ops.QUANT_FORMATS)}, dtype float32, no qkv bias")
        self.qweights: dict = {n: ([None] * config.n_layers if n != "lm_head" else None) for n in self.quantized}
        # tied embeddings kept quantised in a GGUF file: (ggml type, (V, bytes) blocks) that the
        # fused decoding step uses as the classifier, as llama.cpp does (the embedding is float)
        self.tied_head: Optional[tuple[str, np.ndarray]] = None
        self.tape = Tape(device, dtype)
        self.tape.seed = 0 if seed is None else int(seed)
        self.params = Params(device, dtype, param_layout(config, self.quantized))
        self.logits: Optional[Tensor] = None
        self.loss: Optional[Tensor] = None
        self._init_kv_cache(config.n_layers, config.qkv_width)
        if config.bitnet:
            self.bitlinear = frozenset(bitnet.BITLINEAR)
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """N(0, init_std) matrices and embeddings, residual output projections (attn_out,
        down, mtp) scaled by 1/sqrt(2L), zero biases, unit norm weights, zero padded rows."""
        cfg, p = self.config, self.params
        rng = np.random.default_rng(seed)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name in p:
            pad = cfg.vocab_size if name in ("wte", "lm_head") else None
            if "norm" in name:
                p.init_(name, 1.0)
            elif name in ("attn_out", "down", "mtp"):
                p.init_(name, std=residual_std, rng=rng)
            elif p.decay[name]:
                p.init_(name, std=cfg.init_std, rng=rng, zero_rows_from=pad)
            else:
                p.init_(name, 0.0)

    # ------------------------------------------------------------------ forward / backward

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        cfg, t = self.config, self.tape
        if cfg.norm == "rmsnorm":
            return ops.rmsnorm(t, x, weight, cfg.norm_eps)
        return ops.layernorm(t, x, weight, None, cfg.norm_eps)

    def _norm_linear(self, x: Tensor, norm: str, name: str, l: int, bias: Optional[Tensor] = None) -> Tensor:
        """linear(norm(x)) of matrix `name` in layer l (then its adapters), through
        ops.rmsnorm_linear (the normed input recomputed in the backward, not stored) where
        nothing needs it kept: layernorm models, quantised or BitLinear matrices and LoRA
        dropout take the plain path."""
        cfg, p, t, lora = self.config, self.params, self.tape, self.adapters
        if (cfg.norm != "rmsnorm" or name in self.quantized or name in self.bitlinear
                or (lora is not None and lora.dropout)):
            return self._linear(self._norm(x, p[norm][l]), name, l, bias)
        return ops.rmsnorm_linear(t, x, p[norm][l], cfg.norm_eps, p[name][l], bias,
                                  lora.group(name, l) if lora is not None else None)

    def _classify(self, h: Tensor) -> Tensor:
        """Logits of normed final hidden states: the tied embedding or the lm_head."""
        if self.config.tie_embeddings:
            return ops.linear(self.tape, h, self.params["wte"])
        return self._linear(h, "lm_head")

    def _classify_loss(self, h: Tensor, targets: np.ndarray) -> tuple[Tensor, Tensor]:
        """(logits, cross-entropy) of normed final hidden states; label smoothing and z-loss
        apply in training mode only, so an evaluation reports the plain next-token loss.
        One fused op (ops.classifier_xent) unless fuse_classifier is off or lm_head is quantised."""
        cfg, t = self.config, self.tape
        smoothing, z_loss = (cfg.label_smoothing, cfg.z_loss) if t.training else (0.0, 0.0)
        if self.fuse_classifier and "lm_head" not in self.quantized:
            weight = self.params["wte" if cfg.tie_embeddings else "lm_head"]
            return ops.classifier_xent(t, h, weight, targets, cfg.vocab_size, smoothing, z_loss)
        logits = self._classify(h)
        return logits, ops.cross_entropy(t, logits, targets, cfg.vocab_size, smoothing, z_loss)

    def _block(self, x: Tensor, l: int, pos0: int = 0, cache: Optional[Tensor] = None) -> Tensor:
        """One transformer block on positions pos0.. of x. With a cache (B, capacity, W),
        the rotated qkv rows are stored at pos0.. and attention reads keys 0..pos0+T-1."""
        cfg, p, t = self.config, self.params, self.tape
        NH, NKV = cfg.n_heads, cfg.n_kv_heads
        local = cfg.is_local(l)
        qkv = self._norm_linear(x, "attn_norm", "qkvw", l, p["qkvb"][l] if cfg.qkv_bias else None)
        if cfg.qk_norm:
            qkv = ops.qk_norm(t, qkv, p["q_norm"][l], p["k_norm"][l], NH, NKV, cfg.norm_eps)
        theta = cfg.rope_local_theta if (local and cfg.rope_local_theta) else cfg.rope_theta
        qkv = ops.rope_(t, qkv, NH, NKV, pos0, theta, cfg.rope_pairing, cfg.rope_scaling)
        window = cfg.sliding_window if local else 0
        h = self._attention(qkv, NH, NKV, window, pos0, cache)
        if cfg.bitnet:
            h = self._norm(h, p["attn_sub_norm"][l])
        h = self._linear(h, "attn_out", l)
        if cfg.post_norms:
            h = self._norm(h, p["post_attn_norm"][l])
        x = ops.residual_(t, ops.dropout(t, h, cfg.dropout), x)
        h = self._norm_linear(x, "ffn_norm", "gate_up", l)
        lora = self.adapters
        if cfg.bitnet or "down" in self.quantized or "down" in self.bitlinear or (lora is not None and lora.dropout):
            h = ops.glu(t, h, FFN_ACTS[cfg.ffn_kind])
            if cfg.bitnet:
                h = self._norm(h, p["ffn_sub_norm"][l])
            h = self._linear(h, "down", l)
        else:   # the GLU output is recomputed in the backward, not stored (ops.glu_linear)
            h = ops.glu_linear(t, h, p["down"][l], FFN_ACTS[cfg.ffn_kind],
                               lora.group("down", l) if lora is not None else None)
        if cfg.post_norms:
            h = self._norm(h, p["post_ffn_norm"][l])
        return ops.residual_(t, ops.dropout(t, h, cfg.dropout), x)

    def _trunk(self, idx: np.ndarray, pos0: int = 0, caches: Optional[list] = None) -> Tensor:
        """Embedding and every block: the final residual stream (B, T, C), before the norm.

        A tape that is not recording (inference: a prefill, forward_inference) keeps no
        layer's activations past its layer: the residual stream waits between blocks in
        the model's own buffer (`_stream`) while the tape's arenas rewind, so a prompt's
        activation memory is one layer's, not n_layers' (the 58M model's 512-token
        prefill: 89 -> 12 MiB), and every layer reuses the same, already touched pages."""
        cfg, p, t = self.config, self.params, self.tape
        x = ops.embedding(t, idx, p["wte"])
        if cfg.embed_scale:
            x = ops.scale(t, x, math.sqrt(cfg.dim))
        if t.recording:
            for l in range(cfg.n_layers):
                x = self._block(x, l, pos0, caches[l] if caches else None)
            return x
        if getattr(self, "_stream", None) is None:
            self._stream = Arena(t.device, t.dtype, with_grad=False, name="stream")
        self._stream.reset()
        stream = self._stream.alloc(x.shape)
        for l in range(cfg.n_layers):
            t.k.copy_(stream.data, x.data)
            t.acts.reset()   # nothing recorded reads them: the next block's outputs take their place
            t.saved.reset()
            x = self._block(stream, l, pos0, caches[l] if caches else None)
        t.k.copy_(stream.data, x.data)
        return stream

    def forward(self, idx: np.ndarray, targets: Optional[np.ndarray] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Run the model on (B, T) token ids; returns the (B, T, Vp) logits tensor and,
        with (B, T) targets (-1 = ignore), the (1,) mean-loss tensor. Records for backward().

        With n_predict = K > 1 the loss is the MEAN over the K heads of each head's mean
        cross-entropy; head k (k >= 1) predicts token t+1+k from norm(x + x @ mtp[k-1]^T),
        x the last block's output, through the shared classifier. The returned logits are
        the next-token head's.
        """
        cfg, p, t = self.config, self.params, self.tape
        self._check_batch(idx, targets)
        t.begin_forward()
        x = self._trunk(idx)
        self.loss = None
        if targets is None:
            self.logits = self._classify(self._norm(x, p["norm_f"]))
        else:
            self.logits, self.loss = self._classify_loss(self._norm(x, p["norm_f"]), targets)
            if cfg.n_predict > 1:
                for k in range(1, cfg.n_predict):
                    h = ops.add(t, x, ops.linear(t, x, p["mtp"][k - 1]))
                    _, loss_k = self._classify_loss(self._norm(h, p["norm_f"]), multi_token_targets(targets, k))
                    self.loss = ops.add(t, self.loss, loss_k)
                self.loss = ops.scale(t, self.loss, 1.0 / cfg.n_predict)
        return self.logits, self.loss

    # ------------------------------------------------------------------ generation with a KV cache

    def _head(self, x: Tensor) -> Tensor:
        """Logits of final residual rows (the final norm, then the classifier)."""
        return self._classify(self._norm(x, self.params["norm_f"]))

    def _decode_one(self, token: int, pos: int) -> Optional[np.ndarray]:
        """One token through every layer in one kernel call (kernels/cpu/decode.py), for the
        shapes it covers: CPU float32, RMSNorm, SwiGLU, no biases / qk-norm / post-norms /
        embedding scale / sliding window / adapters, weights float32 or in a format with an
        integer dot kernel (quant.QDOT_CODES, BitNet's packed "T2" rows). A BitNet model
        (config.bitnet) runs its sub-norms in the step; its projections must be kept packed or
        quantised, or have left `bitlinear` (float weights already ternary): latent weights
        need the tape's BitLinear quantisers. Otherwise None."""
        from nt.kernels.cpu import decode
        cfg, t = self.config, self.tape
        if (t.device != "cpu" or t.dtype != np.float32 or self.adapters is not None
                or any(name not in self.quantized for name in self.bitlinear)
                or cfg.norm != "rmsnorm" or cfg.ffn_kind != "swiglu" or cfg.qk_norm or cfg.post_norms
                or cfg.embed_scale or cfg.qkv_bias or cfg.sliding_window
                or any(kind not in _decode_codes() for kind in self.quantized.values())):
            return None
        plan = getattr(self, "_decode_plan", None)
        if plan is None or plan[0] is not self._kv_all:   # the cache is new: a new generation
            plan = self._decode_plan = (self._kv_all,) + self._decode_args()
        # the step writes the cache row at pos and reads the embedding row of token unchecked
        if not (0 <= token < cfg.vocab_size and 0 <= pos < self._kv_all.shape[2]):
            raise IndexError(f"decode step: token {token} must be in [0, {cfg.vocab_size}) and position {pos} "
                             f"in the KV cache's [0, {self._kv_all.shape[2]})")
        logits = np.empty(plan[-1], np.float32)
        # the step's workers: Numba's thread count, read here (read inside, it stops the step caching)
        decode.llama_decode_step(logits, token, pos, *plan[1:-1], numba.get_num_threads())
        return logits

    def _decode_args(self) -> tuple:
        """llama_decode_step's arguments after (logits, token, pos), and the logits' length.
        A matrix runs on blocks when it is kept quantised (`quantized`, one type) or when the
        loader left decode-only blocks beside its float copy (`decode_blocks`: a GGUF
        matrix whose layers or q/k/v parts mix block types; the tape path reads the float)."""
        cfg, p, L = self.config, self.params, self.config.n_layers
        none_f = np.zeros((L, 0, 0), np.float32)
        shapes = {name: (L,) + shape[-2:] for name, shape, _ in param_layout(cfg)}
        decode_blocks = getattr(self, "decode_blocks", {})
        wf, wq, parts = [], [], np.zeros((4, L, 3, 3), np.int64)
        parts[:, :, :, 1] = -1
        for m, name in enumerate(("qkvw", "attn_out", "gate_up", "down")):
            if name in self.quantized:
                if isinstance(self.qweights[name], list):   # one (L, OC, bytes) array from now on
                    self.qweights[name] = np.stack(self.qweights[name])
                kind = self.quantized[name]
                flat = _checked_blocks(self.qweights[name], name, kind, shapes[name]).reshape(-1)
                kinds = [[kind] * len(_decode_part_rows(cfg, name))] * L
            elif name in decode_blocks:
                flat, kinds = decode_blocks[name]
            else:
                wf.append(p[name].data)
                wq.append(np.zeros(0, np.uint8))
                continue
            parts[m] = _decode_parts(flat, kinds, name, _decode_part_rows(cfg, name), shapes[name][-1], L)
            wf.append(none_f)
            wq.append(flat)
        if "lm_head" in self.quantized or (cfg.tie_embeddings and self.tied_head is not None):
            kind, head_q = (self.quantized["lm_head"], self.qweights["lm_head"]) if "lm_head" in self.quantized \
                else self.tied_head
            head_q = _checked_blocks(head_q, "classifier", kind, (head_q.shape[0], cfg.dim))
            head_f, head_code = none_f[0], _decode_codes()[kind]
        else:
            head_f, head_q, head_code = p["wte" if cfg.tie_embeddings else "lm_head"].data, np.zeros((0, 0), np.uint8), -1
        # BitNet's sub-norms, or (L, 0): none
        sub = tuple(p[name].data if cfg.bitnet else np.zeros((L, 0), np.float32)
                    for name in ("attn_sub_norm", "ffn_sub_norm"))
        cache = self._kv_all.data[:, 0]
        inv_freq = ops.rope_frequencies(cfg.hs, cfg.rope_theta, cfg.rope_scaling)
        return (p["wte"].data, p["attn_norm"].data, p["ffn_norm"].data, p["norm_f"].data) + sub + (
                tuple(wf), tuple(wq), parts, head_f, head_q, head_code, cache, inv_freq,
                cfg.rope_pairing == "half", cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, np.float32(cfg.norm_eps),
                head_f.shape[0] or head_q.shape[0])


def _decode_part_rows(cfg: LlamaConfig, name: str) -> tuple:
    """The row counts of a per-layer matrix's parts as the fused decoder splits it."""
    q, kv = cfg.n_heads * cfg.hs, cfg.n_kv_heads * cfg.hs
    return {"qkvw": (q, kv, kv), "attn_out": (cfg.dim,), "gate_up": (cfg.ffn_hidden,) * 2, "down": (cfg.dim,)}[name]


def _decode_parts(flat: np.ndarray, kinds: list, name: str, rows: tuple, C: int, L: int) -> np.ndarray:
    """(L, 3, 3) (byte offset, code, bytes per row) of each layer's parts in `flat` (uint8,
    layer after layer, part after part, each part `rows[p]` rows of `kinds[l][p]` blocks of C
    values). ValueError unless flat holds exactly that and each layer's parts share one
    activation format (the decoder quantises a matrix's input once): the kernels read unchecked."""
    from nt.kernels.cpu import quant
    codes = _decode_codes()
    if len(kinds) != L:
        raise ValueError(f"decode blocks of {name} list {len(kinds)} layers' block types, the model has {L}")
    out = np.zeros((L, 3, 3), np.int64)
    out[:, :, 1] = -1
    at = 0
    for l, layer in enumerate(kinds):
        if len(layer) != len(rows) or any(k not in codes for k in layer):
            raise ValueError(f"{name} layer {l}: parts {layer}, want {len(rows)} of {sorted(codes)}")
        if len({quant.QDOT_BLOCK[codes[k]] if k in quant.QDOT_CODES else k for k in layer}) != 1:
            raise ValueError(f"{name} layer {l}: parts {layer} need different activation formats")
        for j, (kind, n) in enumerate(zip(layer, rows)):
            nbytes = _row_bytes(kind, C)
            out[l, j] = (at, codes[kind], nbytes)
            at += n * nbytes
    if not isinstance(flat, np.ndarray) or flat.dtype != np.uint8 or flat.ndim != 1 or flat.size != at \
            or not flat.flags.c_contiguous:
        raise ValueError(f"decode blocks of {name} must be one C-contiguous uint8 array of {at} bytes, got "
                         f"{getattr(flat, 'dtype', type(flat))} {getattr(flat, 'shape', '')}")
    return out


def _decode_codes() -> dict[str, int]:
    """The fused decoder's weight code of each kept format (float32 weights: -1)."""
    from nt.kernels.cpu import bitnet as bitnet_kernels, quant
    return {**quant.QDOT_CODES, "T2": bitnet_kernels.T2_CODE}


def _row_bytes(kind: str, C: int) -> int:
    """Bytes of one row of C values as `kind` (ggml blocks with an integer dot kernel, or T2:
    C/4 bytes of 2-bit codes, then the row's f16 scale); ValueError when C is no whole
    number of blocks."""
    from nt.kernels.cpu import quant
    if kind == "T2":
        bs, ts = 4, 1
    else:
        bs, ts = quant.QDOT_BLOCK[quant.QDOT_CODES[kind]], quant.QDOT_TYPE_SIZE[quant.QDOT_CODES[kind]]
    if C % bs:
        raise ValueError(f"a {kind} row holds a multiple of {bs} values, not {C}")
    return C // 4 + 2 if kind == "T2" else C // bs * ts


def _checked_blocks(w: np.ndarray, name: str, kind: str, shape: tuple) -> np.ndarray:
    """w if it holds `shape` (..., OC, C) as C-contiguous uint8 rows of `kind` (ggml blocks,
    or T2: C/4 bytes of codes and an f16 scale), else ValueError: the decoding kernels read
    the rows unchecked."""
    want = shape[:-1] + (_row_bytes(kind, shape[-1]),)
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.shape != want \
            or not w.flags.c_contiguous:
        raise ValueError(f"quantised {name} must be C-contiguous uint8 {want} ({kind} rows of {shape[-1]} "
                         f"values), got {getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    from nt.kernels.cpu import bitnet as bitnet_kernels
    if kind == "T2" and not bitnet_kernels.t2_codes_valid(w.reshape(-1, want[-1])):
        raise ValueError(f"{name}: T2 rows hold a 2-bit field of 3, which is no ternary code (pack with "
                         f"nt.bitnet.pack_ternary)")
    return w
