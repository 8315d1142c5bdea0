"""Hebbian learning: a linear layer's weight changes from its own input and output
activations, with no loss and no backward pass, so a model can keep learning at inference
time ("Hebbian microlearning").

For a batch of N pairs (input x_n, output y_n) of a layer y = W x, row i of W (OC, C) moves
by the batch mean of the per-example rule (one fused kernel over W, CPU or CUDA):

    "hebb" (plain Hebb with decay):  dW_i = lr * (mean_n y_ni x_n - decay * W_i)
    "oja"  (Oja's rule, per row):    dW_i = lr * (mean_n y_ni x_n - mean_n y_ni^2 * W_i)

"oja" is Oja's single-neuron rule applied to every output unit independently (each row
keeps a bounded norm and turns towards its inputs' principal direction), not Oja's
subspace rule (which subtracts y_i sum_k y_k W_k and decorrelates the rows). With y the
layer's own output the learning is unsupervised; with y clamped to a target (1 for the
class of x, 0 for the others) row i becomes the mean of its class's inputs under "oja"
(y^2 = 1 on its examples) or that mean / decay under "hebb": a prototype classifier that
learns a new class from a handful of examples without touching the others.

    layer = HebbianLinear(64, 10, rule="oja", lr=0.1)
    y = layer(features)                       # inference: (N, 10) = features @ W^T
    layer.learn(features)                     # unsupervised: y from the layer itself
    layer.learn(features, targets=onehot)     # supervised: y clamped to the targets
    y = layer.forward(tape, x); update(layer.weight, x, y, lr=0.1)   # Tensors on a model's tape
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

from . import ops
from .backend import backend
from .tape import Tape
from .tensor import Params, Tensor

RULES = ("hebb", "oja")

Array = Union[Tensor, np.ndarray]


def _data(a: Array, name: str):
    """The array behind a Tensor (its current values), or the array itself."""
    if isinstance(a, Tensor):
        return a.data
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return a
    raise TypeError(f"hebbian: {name} must be an nt Tensor or an array, got {type(a).__name__}")


def update(weight: Array, x: Array, y: Array, lr: float, rule: str = "oja", decay: float = 0.0,
           device: Optional[str] = None) -> None:
    """Change weight (OC, C) in place by one Hebbian step from inputs x (..., C) and
    outputs y (..., OC) (rows paired, leading axes flattened): see the module docstring.

    Tensors or arrays of one float dtype on one device (`device` defaults to the weight
    Tensor's, else "cpu"). lr and decay are finite and non-negative; decay is used by
    "hebb" only. Call it after a forward: it reads x and y, never a gradient."""
    if rule not in RULES:
        raise ValueError(f"hebbian: rule must be one of {RULES}, got {rule!r}")
    for name, v in (("lr", lr), ("decay", decay)):
        if not (isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v) and v >= 0):
            raise ValueError(f"hebbian: {name} must be a finite number >= 0, got {v!r}")
    if device is None:
        device = weight.arena.device if isinstance(weight, Tensor) else "cpu"
    w, xs, ys = _data(weight, "weight"), _data(x, "x"), _data(y, "y")
    wshape, xshape, yshape = tuple(w.shape), tuple(xs.shape), tuple(ys.shape)  # device arrays' shapes too
    if len(wshape) != 2:
        raise ValueError(f"hebbian: weight must be (OC, C), got shape {wshape}")
    OC, C = wshape
    if not xshape or not yshape or xshape[-1] != C or yshape[-1] != OC or xshape[:-1] != yshape[:-1] \
            or xs.size == 0:
        raise ValueError(f"hebbian: x {xshape} and y {yshape} must be non-empty (..., {C}) "
                         f"and (..., {OC}) with the same leading shape, for weight {wshape}")
    if not (w.dtype == xs.dtype == ys.dtype and np.dtype(w.dtype) in (np.float32, np.float64)):
        raise TypeError(f"hebbian: weight, x and y must share float32 or float64, got {w.dtype}, {xs.dtype}, {ys.dtype}")
    N = xs.size // C
    backend(device).hebbian_update(w, xs.reshape(N, C), ys.reshape(N, OC), float(lr), float(decay), rule == "oja")


class HebbianLinear:
    """A bias-free linear layer y = x @ W^T whose weight (out_features, in_features) learns
    by a Hebbian rule instead of gradients. The weight lives in its own Params (frozen: no
    grad buffer, untouched by optimizers and by any backward), so forward() can sit on a
    model's tape after its last op."""

    def __init__(self, in_features: int, out_features: int, rule: str = "oja", lr: float = 0.01,
                 decay: float = 0.0, device: str = "cpu", dtype=np.float32, init_std: float = 0.0,
                 seed: int = 0):
        if rule not in RULES:
            raise ValueError(f"HebbianLinear: rule must be one of {RULES}, got {rule!r}")
        if int(in_features) <= 0 or int(out_features) <= 0:
            raise ValueError(f"HebbianLinear: sizes must be positive, got {in_features} -> {out_features}")
        self.rule, self.lr, self.decay = rule, float(lr), float(decay)
        self.params = Params(device, dtype, [("weight", (int(out_features), int(in_features)), False)], trainable=())
        if init_std:
            w = np.random.default_rng(seed).normal(0.0, init_std, self.weight.shape)
            self.params.load_flat(w.reshape(-1))
        self.tape = Tape(device, dtype)   # for calls on NumPy inputs

    @property
    def weight(self) -> Tensor:
        return self.params["weight"]

    def forward(self, t: Tape, x: Tensor) -> Tensor:
        """y = x @ W^T on the tape `t` (after a model's forward, e.g. on its features)."""
        return ops.linear(t, x, self.weight)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """y = x @ W^T for a host array x (..., in_features): a copy of the outputs."""
        x = self._host(x)
        t = self.tape
        t.reset(recording=False)
        xt = t.new(x.shape)
        t.k.copy_(xt.data, t.k.to_device(x))
        return np.array(t.k.to_host(self.forward(t, xt).data))

    def _host(self, x) -> np.ndarray:
        C = self.weight.shape[1]
        if not isinstance(x, np.ndarray) or x.ndim < 1 or x.shape[-1] != C or x.size == 0:
            raise ValueError(f"HebbianLinear: x must be a non-empty (..., {C}) array, got "
                             f"{getattr(x, 'shape', type(x))}")
        return np.ascontiguousarray(x, dtype=self.params.dtype)

    def learn(self, x: np.ndarray, targets: Optional[np.ndarray] = None) -> None:
        """One Hebbian step from host inputs x (..., in_features): y is the layer's own output
        (unsupervised), or `targets` (..., out_features) clamped in its place (supervised).
        For Tensors already on a tape, call update(layer.weight, x, y, ...) after forward()."""
        x = self._host(x)
        y = self(x) if targets is None else np.ascontiguousarray(targets, dtype=self.params.dtype)
        k = backend(self.params.device)
        update(self.weight, k.to_device(x), k.to_device(y), self.lr, self.rule, self.decay)
