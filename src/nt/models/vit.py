"""A Vision Transformer (Dosovitskiy et al., 2020) from nt's ops: patches embedded by one
gemm, a CLS token and learned positions, pre-LN blocks with bidirectional attention and a
GELU MLP, a final layernorm, CLS (or mean) pooling and a linear classifier."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import ops
from ..tape import Tape
from ..tensor import Params, Tensor


@dataclass
class ViTConfig:
    """Shape of a ViT. The image is image_size x image_size with `channels` channels, cut
    into (image_size / patch)^2 patches; `width` is the residual width C, `depth` the
    number of blocks, `heads` the attention heads, `mlp` the MLP's hidden width as a
    multiple of C; `pool` "cls" or "mean" picks the classifier's input."""

    image_size: int = 8
    patch: int = 2
    channels: int = 1
    width: int = 64
    depth: int = 4
    heads: int = 4
    classes: int = 10
    dropout: float = 0.0
    mlp: int = 4
    pool: str = "cls"

    def __post_init__(self):
        for field in ("image_size", "patch", "channels", "width", "depth", "heads", "classes", "mlp"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ViTConfig.{field} must be a positive integer, got {value!r}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch ({self.patch})")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


def param_layout(cfg: ViTConfig) -> list[tuple[str, tuple, bool]]:
    """(name, shape, weight-decay?) of every parameter; per-block tensors stacked over depth."""
    C, L, H = cfg.width, cfg.depth, cfg.mlp * cfg.width
    K = cfg.channels * cfg.patch * cfg.patch
    return [
        ("patchw", (C, K), True), ("patchb", (C,), False),
        ("cls", (C,), False), ("pos", (cfg.n_patches + 1, C), False),
        ("ln1w", (L, C), False), ("ln1b", (L, C), False),
        ("qkvw", (L, 3 * C, C), True), ("qkvb", (L, 3 * C), False),
        ("projw", (L, C, C), True), ("projb", (L, C), False),
        ("ln2w", (L, C), False), ("ln2b", (L, C), False),
        ("fcw", (L, H, C), True), ("fcb", (L, H), False),
        ("fcprojw", (L, C, H), True), ("fcprojb", (L, C), False),
        ("lnfw", (C,), False), ("lnfb", (C,), False),
        ("headw", (cfg.classes, C), True), ("headb", (cfg.classes,), False),
    ]


class ViT:
    """An image classifier on nt's tape.

    >>> model = ViT(ViTConfig(image_size=8, patch=2, channels=1, classes=10))
    >>> logits, loss = model(images, labels)  # images (N, Ch, H, W) float, labels (N,) ints
    >>> model.zero_grad(); model.backward()   # grads land in model.params.grad
    """

    def __init__(self, config: ViTConfig, device: str = "cpu", dtype=np.float32, seed: Optional[int] = 0):
        self.config = config
        self.tape = Tape(device, dtype)
        self.params = Params(device, dtype, param_layout(config))
        self.logits: Optional[Tensor] = None
        self.loss: Optional[Tensor] = None
        self.tokens: Optional[Tensor] = None    # the final layernorm's (N, 1 + P, C) output of the last forward
        self.features: Optional[Tensor] = None  # its pooled (N, C) rows: the classifier's input
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """N(0, 0.02) matrices, positions and CLS token; residual projections scaled by
        1/sqrt(2 depth) (as GPT-2); zero biases and classifier; unit layernorm weights."""
        rng = np.random.default_rng(seed)
        host = np.zeros(self.params.numel, dtype=np.float64)
        residual_std = 0.02 / np.sqrt(2 * self.config.depth)
        for name, t in self.params.items():
            o = self.params.offsets[name]
            view = host[o:o + t.size].reshape(t.shape)
            if name in ("ln1w", "ln2w", "lnfw"):
                view[:] = 1.0
            elif name in ("projw", "fcprojw"):
                view[:] = rng.normal(0.0, residual_std, t.shape)
            elif name == "patchw":  # as PyTorch's Conv2d: std ~ 1/sqrt(fan-in), so patches differ from the start
                view[:] = rng.normal(0.0, 1.0 / np.sqrt(t.shape[1]), t.shape)
            elif name in ("qkvw", "fcw", "pos", "cls"):
                view[:] = rng.normal(0.0, 0.02, t.shape)
        self.params.load_flat(host)

    def _check_batch(self, images, labels) -> None:
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != want \
                or images.shape[0] == 0 or images.dtype.kind != "f":
            raise ValueError(f"images must be a float (N, {want[0]}, {want[1]}, {want[2]}) NumPy array with N >= 1, "
                             f"got {getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
        if labels is not None:
            ops.check_ids(labels, "labels", cfg.classes, 1)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")

    def forward(self, images: np.ndarray, labels: Optional[np.ndarray] = None,
                record: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Run the model on images (N, Ch, H, W) (float, e.g. from nt.vision.to_chw); returns
        the (N, classes) logits tensor and, with (N,) integer labels, the (1,) mean
        cross-entropy tensor. Records for backward() unless record=False (inference)."""
        cfg, p, t = self.config, self.params, self.tape
        self._check_batch(images, labels)
        t.begin_forward(recording=record)
        x = t.new(images.shape)
        t.k.copy_(x.data, t.k.to_device(np.ascontiguousarray(images, dtype=t.dtype)))
        h = ops.patch_embed(t, x, p["patchw"], p["patchb"], cfg.patch)
        h = ops.dropout(t, ops.cls_tokens(t, h, p["cls"], p["pos"]), cfg.dropout)
        for l in range(cfg.depth):
            a = ops.layernorm(t, h, p["ln1w"][l], p["ln1b"][l])
            a = ops.attention(t, ops.linear(t, a, p["qkvw"][l], p["qkvb"][l]), cfg.heads, causal=False)
            a = ops.dropout(t, ops.linear(t, a, p["projw"][l], p["projb"][l]), cfg.dropout)
            h = ops.add(t, h, a)
            m = ops.layernorm(t, h, p["ln2w"][l], p["ln2b"][l])
            m = ops.gelu(t, ops.linear(t, m, p["fcw"][l], p["fcb"][l]))
            m = ops.dropout(t, ops.linear(t, m, p["fcprojw"][l], p["fcprojb"][l]), cfg.dropout)
            h = ops.add(t, h, m)
        h = self.tokens = ops.layernorm(t, h, p["lnfw"], p["lnfb"])
        self.features = ops.cls_pool(t, h) if cfg.pool == "cls" else ops.mean_pool(t, h)
        self.logits = ops.linear(t, self.features, p["headw"], p["headb"])
        self.loss = ops.cross_entropy(t, self.logits, labels) if labels is not None else None
        return self.logits, self.loss

    def __call__(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[float]]:
        """(logits (N, classes) as a NumPy array, mean loss or None). The logits are a view
        of the model's activation memory on the CPU, overwritten by the next forward."""
        logits, loss = self.forward(images, labels)
        return logits.numpy(), (float(loss.numpy()[0]) if loss is not None else None)

    def backward(self) -> None:
        """Backpropagate the last forward's loss; parameter grads accumulate."""
        if self.loss is None:
            raise RuntimeError("backward() needs a forward with labels first")
        self.tape.backward(self.loss)

    def zero_grad(self) -> None:
        self.params.zero_grad()

    def train(self, mode: bool = True) -> "ViT":
        """Training mode: dropout active. Returns the model."""
        self.tape.training = bool(mode)
        return self

    def eval(self) -> "ViT":
        """Evaluation mode: dropout is the identity. Returns the model."""
        return self.train(False)

    def predict(self, images: np.ndarray, batch_size: int = 256, tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(predicted classes (N,), features) in eval mode, batch_size images at a time,
        recording nothing. Features are copies of the pooled classifier inputs (N, C), or
        with tokens=True of every token of the final layernorm, flattened: (N, (1 + P) * C)."""
        was_training = self.tape.training
        self.eval()
        classes, features = [], []
        try:
            for i in range(0, images.shape[0], batch_size):
                logits, _ = self.forward(images[i:i + batch_size], record=False)
                classes.append(np.argmax(logits.numpy(), axis=1))
                kept = self.tokens if tokens else self.features
                features.append(np.array(kept.numpy()).reshape(kept.shape[0], -1))
        finally:
            self.train(was_training)
        return np.concatenate(classes), np.concatenate(features)

    @property
    def num_params(self) -> int:
        return self.params.numel
