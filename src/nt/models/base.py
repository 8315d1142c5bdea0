"""What every nt language model shares: the nanoGPT-style call, backward, sampling,
train/eval modes and flat weight loading. A model supplies `config` (with block_size and
vocab_size), `tape`, `params` and `forward(idx, targets) -> (logits, loss)` tensors."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..tensor import Tensor


class LanguageModel:
    """Mixin: the model interface built on `forward`."""

    loss: Optional[Tensor] = None

    def forward(self, idx: np.ndarray, targets: Optional[np.ndarray] = None):
        raise NotImplementedError

    def _check_batch(self, idx, targets) -> None:
        cfg = self.config
        if not isinstance(idx, np.ndarray) or idx.ndim != 2:
            raise ValueError(f"idx must be a (B, T) integer NumPy array, got {getattr(idx, 'shape', type(idx))}")
        if idx.shape[1] > cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's block_size {cfg.block_size}")
        if targets is not None and getattr(targets, "shape", None) != idx.shape:
            raise ValueError(f"targets must have the same shape as idx {idx.shape}, "
                             f"got {getattr(targets, 'shape', None)}")

    def __call__(self, idx: np.ndarray, targets: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[float]]:
        """nanoGPT-style: (logits (B, T, V) as a NumPy array, mean loss or None).

        The logits are a view of the model's activation memory (on the CPU) and are
        overwritten by the next forward: copy them to keep them.
        """
        logits, loss = self.forward(idx, targets)
        V = self.config.vocab_size
        return logits.numpy()[..., :V], (float(loss.numpy()[0]) if loss is not None else None)

    def backward(self) -> None:
        """Backpropagate the last forward's loss; parameter grads accumulate."""
        if self.loss is None:
            raise RuntimeError("backward() needs a forward with targets first")
        self.tape.backward(self.loss)

    def zero_grad(self) -> None:
        self.params.zero_grad()

    def train(self, mode: bool = True) -> "LanguageModel":
        """Training mode: dropout active. Returns the model."""
        self.tape.training = bool(mode)
        return self

    def eval(self) -> "LanguageModel":
        """Evaluation mode: dropout is the identity. Returns the model."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.tape.training

    def load_flat(self, values: np.ndarray) -> None:
        """Set every parameter from one flat array in this model's layout."""
        if values.shape != (self.params.size,):
            raise ValueError(f"expected {self.params.size} parameter values, got shape {values.shape}")
        k = self.tape.k
        k.copy_(self.params.flat, k.to_device(np.ascontiguousarray(values, dtype=self.params.dtype)))

    @property
    def num_params(self) -> int:
        return self.params.size

    def _begin_generation(self, capacity: int) -> None:
        """Called before sampling at most `capacity` positions (a model with a KV cache
        sizes it here)."""

    def _next_logits(self, tokens: list) -> np.ndarray:
        """The float64 next-token logits (V,) after `tokens`: a full forward over the last
        block_size tokens (models with a KV cache override this)."""
        ctx = np.asarray(tokens[-self.config.block_size:], dtype=np.int32)[None, :]
        logits, _ = self.forward(ctx)
        return logits.numpy()[0, -1, :self.config.vocab_size].astype(np.float64)

    def generate(self, idx: np.ndarray, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: Optional[int] = None,
                 on_token: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """Sample `max_new_tokens` continuations of a (T,) prompt; returns prompt + new ids.

        temperature 0 is greedy. The context is cropped to block_size. Runs in eval mode
        (no dropout) and restores the previous mode.
        """
        idx = np.asarray(idx).reshape(-1).astype(np.int32)
        if idx.size == 0:
            raise ValueError("generate() needs at least one prompt token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        rng = np.random.default_rng(seed)
        out = list(idx)
        was_training = self.training
        self.eval()
        try:
            self._begin_generation(min(len(out) + max_new_tokens, self.config.block_size))
            for _ in range(max_new_tokens):
                nxt = sample_logits(self._next_logits(out), temperature, top_k, rng)
                out.append(nxt)
                if on_token is not None:
                    on_token(nxt)
        finally:
            self.train(was_training)
            self.tape.reset()
        return np.asarray(out, dtype=np.int32)


def sample_logits(logits: np.ndarray, temperature: float, top_k: Optional[int], rng: np.random.Generator) -> int:
    """One token id from a row of logits: greedy at temperature 0, else softmax(logits/T)
    restricted to the top_k largest."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    z = np.exp(z - z.max())
    return int(rng.choice(z.size, p=z / z.sum()))
