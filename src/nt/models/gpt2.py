"""GPT-2 exactly as llm.c defines it: pre-LN blocks, fused QKV, 4x GELU MLP, tied embedding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import ops
from ..tape import Tape
from ..tensor import Params, Tensor
from .base import LanguageModel


@dataclass
class GPT2Config:
    """Shape of a GPT-2 model. `padded_vocab_size` rounds the vocabulary up to 128."""

    block_size: int = 1024   # maximum sequence length T
    vocab_size: int = 50257  # real vocabulary V
    n_layer: int = 12        # L
    n_head: int = 12         # NH
    n_embd: int = 768        # C

    PRESETS = {
        # llm.c's GPT-2 family (124M, 350M, 774M, 1558M)
        "d12": dict(n_layer=12, n_head=12, n_embd=768),
        "d24": dict(n_layer=24, n_head=16, n_embd=1024),
        "d36": dict(n_layer=36, n_head=20, n_embd=1280),
        "d48": dict(n_layer=48, n_head=25, n_embd=1600),
        # laptop sizes
        "d6": dict(n_layer=6, n_head=6, n_embd=384),
        "mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
        "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64),
    }

    def __post_init__(self):
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"GPT2Config.{field} must be positive, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def padded_vocab_size(self) -> int:
        return (self.vocab_size + 127) // 128 * 128

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """A named shape ('d12', 'd24', 'd36', 'd48', 'd6', 'mini', 'tiny') with overrides."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


def param_layout(cfg: GPT2Config) -> list[tuple[str, tuple, bool]]:
    """(name, shape, weight-decay?) in llm.c's checkpoint order: the flat buffer IS the file."""
    Vp, T, L, C = cfg.padded_vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    return [
        ("wte", (Vp, C), True), ("wpe", (T, C), True),
        ("ln1w", (L, C), False), ("ln1b", (L, C), False),
        ("qkvw", (L, 3 * C, C), True), ("qkvb", (L, 3 * C), False),
        ("attprojw", (L, C, C), True), ("attprojb", (L, C), False),
        ("ln2w", (L, C), False), ("ln2b", (L, C), False),
        ("fcw", (L, 4 * C, C), True), ("fcb", (L, 4 * C), False),
        ("fcprojw", (L, C, 4 * C), True), ("fcprojb", (L, C), False),
        ("lnfw", (C,), False), ("lnfb", (C,), False),
    ]


class GPT2(LanguageModel):
    """GPT-2 on nt's tape.

    >>> model = GPT2(GPT2Config.preset("tiny", vocab_size=256))
    >>> logits, loss = model(idx, targets)   # forward: (B, T, V) logits, mean loss
    >>> model.zero_grad(); model.backward()  # grads land in model.params.grad
    """

    def __init__(self, config: GPT2Config, device: str = "cpu", dtype=np.float32, seed: Optional[int] = 0):
        self.config = config
        self.tape = Tape(device, dtype)
        self.params = Params(device, dtype, param_layout(config))
        self.logits: Optional[Tensor] = None
        self.loss: Optional[Tensor] = None
        self._init_kv_cache(config.n_layer, 3 * config.n_embd)
        if seed is not None:
            self.init_weights(seed)

    # ------------------------------------------------------------------ weights

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 init: N(0, 0.02) matrices and embeddings, residual projections scaled by
        1/sqrt(2L), zero biases, unit layernorm weights, zero padded-vocabulary rows."""
        cfg, p = self.config, self.params
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / np.sqrt(2 * cfg.n_layer)
        for name in p:
            if name in ("ln1w", "ln2w", "lnfw"):
                p.init_(name, 1.0)
            elif name in ("attprojw", "fcprojw"):
                p.init_(name, std=residual_std, rng=rng)
            elif p.decay[name]:
                p.init_(name, std=0.02, rng=rng, zero_rows_from=cfg.vocab_size if name == "wte" else None)
            else:
                p.init_(name, 0.0)

    # ------------------------------------------------------------------ forward / backward

    def forward(self, idx: np.ndarray, targets: Optional[np.ndarray] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Run the model on (B, T) token ids; returns the (B, T, Vp) logits tensor and,
        with (B, T) targets (-1 = ignore), the (1,) mean-loss tensor. Records for backward()."""
        cfg, p, t = self.config, self.params, self.tape
        self._check_batch(idx, targets)
        t.begin_forward()   # LoRA dropout draws fresh masks each training step
        n = self._trunk(idx)
        self.loss = None
        if targets is not None and self.fuse_classifier:
            self.logits, self.loss = ops.classifier_xent(t, n, p["wte"], targets, cfg.vocab_size)
        else:
            self.logits = self._head(n)
            if targets is not None:
                self.loss = ops.cross_entropy(t, self.logits, targets, cfg.vocab_size)
        return self.logits, self.loss

    def _trunk(self, idx: np.ndarray, pos0: int = 0, caches: Optional[list] = None) -> Tensor:
        """Embeddings, every block and the final layernorm on positions pos0..: the normed
        final residual (B, T, C). With caches (generation) each layer's qkv rows go to its
        KV cache. Each residual and the layernorm after it (ln_2; the next block's ln_1, or
        ln_f after the last) run as one op, ops.residual_layernorm_, and the MLP as one,
        ops.gelu_mlp (unless LoRA adapters or packed weights sit on it)."""
        cfg, p, t = self.config, self.params, self.tape
        x = ops.embedding(t, idx, p["wte"], p["wpe"], pos0)
        n = ops.layernorm(t, x, p["ln1w"][0], p["ln1b"][0])
        plain_mlp = self.adapters is None and not {"fcw", "fcprojw"} & (set(self.quantized) | set(self.bitlinear))
        for l in range(cfg.n_layer):
            qkv = self._linear(n, "qkvw", l, p["qkvb"][l])
            h = self._attention(qkv, cfg.n_head, cfg.n_head, 0, pos0, caches[l] if caches else None)
            h = self._linear(h, "attprojw", l, p["attprojb"][l])
            x, n = ops.residual_layernorm_(t, h, x, p["ln2w"][l], p["ln2b"][l])
            if plain_mlp:   # the GELU output recomputed in the backward, not stored
                h = ops.gelu_mlp(t, n, p["fcw"][l], p["fcb"][l], p["fcprojw"][l], p["fcprojb"][l])
            else:           # adapters add their terms to each linear's output
                h = ops.gelu(t, self._linear(n, "fcw", l, p["fcb"][l]))
                h = self._linear(h, "fcprojw", l, p["fcprojb"][l])
            last = l == cfg.n_layer - 1
            x, n = ops.residual_layernorm_(t, h, x, p["lnfw"] if last else p["ln1w"][l + 1],
                                           p["lnfb"] if last else p["ln1b"][l + 1])
        return n

    def _head(self, n: Tensor) -> Tensor:
        """The tied classifier over the padded vocabulary, on the normed rows _trunk gives."""
        return ops.linear(self.tape, n, self.params["wte"])

    # ------------------------------------------------------------------ llm.c interop

    @classmethod
    def from_llmc(cls, path, device: str = "cpu", dtype=np.float32) -> "GPT2":
        """Load an llm.c GPT-2 checkpoint (`gpt2_124M.bin`-style, magic 20240326).
        Sizes this model cannot take (NH not dividing C, a vocabulary padded other than
        to a multiple of 128) are FormatErrors naming the file."""
        from ..io.common import FormatError, require_finite
        from ..io.llmc import read_llmc_checkpoint
        sizes, flat = read_llmc_checkpoint(path)
        require_finite(flat, f"{path}: the parameters")
        try:
            config = GPT2Config(block_size=sizes.block_size, vocab_size=sizes.vocab_size, n_layer=sizes.n_layer,
                                n_head=sizes.n_head, n_embd=sizes.n_embd)
        except ValueError as e:
            raise FormatError(f"{path}: header describes an impossible model: {e}") from None
        if sizes.padded_vocab_size != config.padded_vocab_size:
            raise FormatError(f"{path}: padded vocab {sizes.padded_vocab_size} is not V={sizes.vocab_size} "
                              f"rounded up to 128 ({config.padded_vocab_size})")
        model = cls(config, device=device, dtype=dtype, seed=None)
        model.load_flat(flat)
        return model

    def save_llmc(self, path) -> None:
        """Write the weights as an llm.c GPT-2 checkpoint (fp32, version 3)."""
        from ..io.llmc import write_llmc_checkpoint
        write_llmc_checkpoint(path, self.config, self.params.to_flat())
