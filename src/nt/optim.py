"""Optimizers over the flat parameter buffer, gradient clipping and LR schedules."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .tensor import Params


class AdamW:
    """AdamW (PyTorch's / llm.c's update rule) as one fused kernel over all parameters.

    Weight decay applies to the parameters declared with decay (matrices and embeddings),
    not to biases and norm weights. Moments m and v mirror the parameter buffer.
    """

    def __init__(self, params: Params, lr: float = 3e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        self.params = params
        self.k = params.k
        self.lr, self.beta1, self.beta2, self.eps, self.weight_decay = lr, betas[0], betas[1], eps, weight_decay
        self.step_count = 0
        self.m = self.k.empty(params.size, params.dtype)
        self.v = self.k.empty(params.size, params.dtype)
        self.k.fill_(self.m, 0.0)
        self.k.fill_(self.v, 0.0)
        self.decay_mask = self.k.to_device(params.decay_mask())

    def step(self, lr: Optional[float] = None) -> None:
        """One update from the grads in `params.grad` (lr overrides the default for this step)."""
        self.step_count += 1
        self.k.adamw_update(self.params.flat, self.params.grad, self.m, self.v, self.decay_mask,
                            self.lr if lr is None else lr, self.beta1, self.beta2, self.eps,
                            self.weight_decay, self.step_count)


def grad_norm(params: Params) -> float:
    """The global L2 norm of all gradients (one reduction over the flat grad buffer)."""
    if params.norm_partials is None:
        params.norm_partials = params.k.empty(params.k.sum_squares_blocks(params.size), np.float64)
    return math.sqrt(params.k.sum_squares(params.grad, params.norm_partials))


def clip_grad_norm(params: Params, max_norm: float) -> float:
    """Scale all grads so their global norm is at most max_norm; returns the norm before."""
    norm = grad_norm(params)
    if norm > max_norm > 0:
        params.k.scale_(params.grad, max_norm / (norm + 1e-6))
    return norm


class CosineSchedule:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to `lr * min_ratio`
    at `total` steps (and constant after)."""

    def __init__(self, lr: float, warmup: int, total: int, min_ratio: float = 0.1):
        if warmup < 0 or total <= 0 or not 0 <= min_ratio <= 1:
            raise ValueError(f"CosineSchedule: invalid warmup={warmup} total={total} min_ratio={min_ratio}")
        self.lr, self.warmup, self.total, self.min_ratio = lr, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        """The learning rate for `step` (counting from 0)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if step >= self.total:
            return self.lr * self.min_ratio
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_ratio + (1.0 - self.min_ratio) * coeff)
