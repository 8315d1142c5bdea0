"""Optimizers over the flat parameter buffer, clipping, loss scaling and learning-rate
schedules.

Every optimizer updates all parameters with one fused kernel over `params.flat` and keeps
its per-element state (moments, momentum) in buffers that mirror it, allocated once in
__init__: a steady-state step allocates nothing. Kernels are reached only through
`params.k` (the backend module), and what crosses between host and device is explicit and
small (a norm, a non-finite count, a few per-tensor numbers).

Every optimizer, the GradScaler and every schedule has `state_dict()` (NumPy arrays and
plain scalars) and `load_state_dict()`, so a checkpoint resumes a run bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .tensor import Params


# ============================================================================ base


class Optimizer:
    """Common state handling. Subclasses name their state in four tuples:

    `_hyper` hyperparameters and `_scalars` counters (plain Python numbers), `_device`
    buffers on the parameters' device, `_host` small NumPy arrays kept on the host.
    `state_dict()` copies all of them out; `load_state_dict()` copies them back in.
    """

    _hyper: tuple[str, ...] = ()
    _scalars: tuple[str, ...] = ("step_count",)
    _device: tuple[str, ...] = ()
    _host: tuple[str, ...] = ()

    def __init__(self, params: Params):
        if params.size == 0:
            raise ValueError("no trainable parameters: every parameter is frozen (model.freeze(trainable=[...]) "
                             "names those to train)")
        self.params = params
        self.step_count = 0
        # the kernels' block table: the segments (one over everything, Chuck's: the tensors)
        # cut into blocks that never straddle a segment or a change of weight decay, each
        # block with its decay flag (a byte per block where a mask took a byte per parameter)
        self._seg_offsets = self._segments(params)
        block_offsets, block_seg, block_decay = block_table(self._seg_offsets, params.decay_mask())
        self._block_offsets = self.k.to_device(block_offsets)
        self._block_seg = self.k.to_device(block_seg)
        self._block_decay = self.k.to_device(block_decay)
        # the clipping factor the kernels read: [factor, norm] in float64 on the device, set
        # by clip_scale(); a host number passed to step(grad_scale=...) goes to a buffer of
        # its own, uploaded only when the number changes (a GPU step uploads nothing else)
        self._grad_scale = self.k.to_device(np.array([1.0, math.nan]))
        self._fixed_scale_host = np.array([1.0, math.nan])
        self._fixed_scale = self.k.to_device(self._fixed_scale_host.copy())

    def _segments(self, params: Params) -> np.ndarray:
        """The optimizer's segments as offsets (S+1,): one over the whole buffer here."""
        return np.array([0, params.size], dtype=np.int64)

    @property
    def k(self):
        """The parameters' kernel module (nt.backend owns it)."""
        return self.params.k

    def clip_scale(self, max_norm: float):
        """The factor that clips the global norm of `params.grad` to max_norm, computed on
        the parameters' device into this optimizer's [factor, norm] buffer, which it returns:
        pass it to step(grad_scale=...). Nothing is read back to the host (on a GPU the step
        stays asynchronous); read the norm when it is wanted: `k.to_host(buf)[1]`. The rule
        is clip_factor's (factor 1 within the limit or for a non-finite norm)."""
        self.k.clip_scale_(self.params.grad, _partials(self.params), float(max_norm), self._grad_scale)
        return self._grad_scale

    def _scale_arg(self, grad_scale):
        """The device array the kernels read the clipping factor from: `grad_scale` itself
        when it is one (a clip_scale() result: float64, on the device), else a host number
        written into the optimizer's own buffer (uploaded when it changes)."""
        if isinstance(grad_scale, (int, float, np.integer, np.floating)):
            if self._fixed_scale_host[0] != grad_scale:
                self._fixed_scale_host[0] = grad_scale
                self.k.copy_(self._fixed_scale, self._fixed_scale_host)
            return self._fixed_scale
        if grad_scale.dtype != np.float64 or grad_scale.ndim != 1 or grad_scale.shape[0] < 1:
            raise ValueError(f"grad_scale must be a number or a float64 array whose first element is the factor, "
                             f"got {getattr(grad_scale, 'dtype', type(grad_scale))} of shape "
                             f"{getattr(grad_scale, 'shape', None)}")
        return grad_scale

    def _zeros(self, n: int, dtype):
        buf = self.k.empty(n, dtype)
        self.k.fill_(buf, 0.0)
        return buf

    def state_dict(self) -> dict:
        """Everything needed to resume: hyperparameters, counters, buffers (host copies)."""
        state = {"type": type(self).__name__}
        for name in self._hyper + self._scalars:
            state[name] = getattr(self, name)
        for name in self._device:
            state[name] = np.array(self.k.to_host(getattr(self, name)), copy=True)
        for name in self._host:
            state[name] = getattr(self, name).copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned. The state is checked as the constructor checks
        its arguments (a file may hold anything): hyperparameters in range, counters
        non-negative integers, buffers finite and of this optimizer's shapes."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state is for a {state.get('type')!r} optimizer, not {type(self).__name__}")
        names = self._hyper + self._scalars + self._device + self._host
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing {missing}")
        for name in self._hyper + self._scalars:
            value = state[name]
            # hyperparameters are finite; a running value may be infinite (Chuck's best loss before any)
            if not isinstance(value, (int, float, np.integer, np.floating)) or math.isnan(value) \
                    or (name in self._hyper and not math.isfinite(value)):
                raise ValueError(f"{type(self).__name__} state {name!r} must be a finite number, got {value!r:.40}")
            if isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool) \
                    and not (math.isfinite(value) and value == int(value) and value >= 0):
                raise ValueError(f"{type(self).__name__} state {name!r} must be an integer >= 0, got {value!r}")
        self._check_hyper(**{name: state[name] for name in self._hyper})
        for name in self._device:
            value = np.asarray(state[name])
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                raise ValueError(f"{type(self).__name__} state {name!r} must hold finite floats")
        for name in self._device + self._host:
            current, value = getattr(self, name), np.asarray(state[name])
            if name in self._device:
                if value.shape != current.shape:
                    raise ValueError(f"{type(self).__name__} state {name!r} has shape {value.shape}, "
                                     f"expected {current.shape}")
                self.k.copy_(current, self.k.to_device(np.ascontiguousarray(value, dtype=current.dtype)))
            else:  # host state may be sized by a hyperparameter that is restored too
                setattr(self, name, np.array(value, dtype=current.dtype))
        for name in self._hyper + self._scalars:
            setattr(self, name, type(getattr(self, name))(state[name]))
        self._check_state()

    def _check_state(self) -> None:
        """Raise if loaded host state does not fit these parameters."""

    def _check_hyper(self, **hyper) -> None:
        """Raise ValueError when hyperparameters break this optimizer's rules (the
        constructor's arguments and a loaded state are checked alike)."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


# ============================================================================ SGD


class SGD(Optimizer):
    """SGD with momentum, PyTorch's rule (weight decay is L2, only where decay applies):

        g = grad + wd * p
        b = g  (first step),  b = momentum * b + (1 - dampening) * g  (later)
        p = p - lr * (g + momentum * b  if nesterov else  b)

    momentum 0 is plain SGD (no momentum buffer is used).
    """

    _hyper = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _device = ("momentum_buf",)

    def __init__(self, params: Params, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        self._check_hyper(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                          nesterov=nesterov)
        super().__init__(params)
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)
        self.momentum_buf = self._zeros(params.size, params.dtype)

    def _check_hyper(self, lr, momentum, dampening, weight_decay, nesterov) -> None:
        _check(0 <= lr < math.inf and 0 <= momentum < 1 and 0 <= dampening <= 1 and 0 <= weight_decay < math.inf,
               f"SGD: invalid hyperparameters lr={lr} momentum={momentum} dampening={dampening} "
               f"weight_decay={weight_decay}")
        _check(not nesterov or (momentum > 0 and dampening == 0),
               "SGD: nesterov needs momentum > 0 and dampening 0")

    def step(self, lr: Optional[float] = None, grad_scale=1.0, *, loss: Optional[float] = None,
             zero_grad: bool = False) -> None:
        """One update from the grads in `params.grad` times `grad_scale` (a number, or
        clip_scale()'s device array; the grads themselves are not changed unless `zero_grad`,
        which leaves them zero, as Adam.step does, here in a pass of its own); lr overrides
        the default for this step. `loss` is accepted by every optimizer and used by those
        that watch it (Chuck)."""
        self.step_count += 1
        self.k.sgd_update(self.params.flat, self.params.grad, self.momentum_buf, self._block_offsets,
                          self._block_decay, self.lr if lr is None else lr, self.momentum, self.dampening,
                          self.weight_decay, self.nesterov, self.step_count == 1, self._scale_arg(grad_scale))
        if zero_grad:
            self.params.zero_grad()


# ============================================================================ Adam / AdamW


class Adam(Optimizer):
    """Adam, PyTorch's rule: weight decay is L2, added to the gradient before the moments
    (only for parameters declared with decay):

        g = grad + wd * p
        m = b1 * m + (1 - b1) * g            v = b2 * v + (1 - b2) * g^2
        p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Adam, AdamW and Chuck share one kernel (`adam_update`) over segments of the flat buffer;
    Adam and AdamW use one segment spanning all parameters.
    """

    decoupled = False  # AdamW: weight decay added to the update instead of the gradient
    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay")
    _device = ("m", "v")

    def __init__(self, params: Params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        Adam._check_hyper(self, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        super().__init__(params)
        self.lr, self.beta1, self.beta2 = float(lr), float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.m = self._zeros(params.size, params.dtype)
        self.v = self._zeros(params.size, params.dtype)
        # Adam's one segment has scale 1 and the step count set every step; Chuck's
        # segments are the tensors, each with its own scale and count
        self._one = self.k.to_device(np.ones(1, dtype=np.float64))
        self._step_host = np.zeros(1, dtype=np.int64)
        self._step = self.k.to_device(self._step_host)  # on a GPU: a device copy, refreshed each step

    def _check_hyper(self, lr, beta1, beta2, eps, weight_decay) -> None:
        _check(0 <= lr < math.inf and 0 < eps < math.inf and 0 <= weight_decay < math.inf
               and 0 <= beta1 < 1 and 0 <= beta2 < 1,
               f"{type(self).__name__}: invalid hyperparameters lr={lr} betas=({beta1}, {beta2}) eps={eps} "
               f"weight_decay={weight_decay}")

    def _check_state(self) -> None:
        if float(np.min(self.k.to_host(self.v), initial=0.0)) < 0:
            raise ValueError(f"{type(self).__name__} state 'v' (second moments) holds negative values")

    def _update(self, seg_scale, seg_step, lr: float, grad_scale, zero_grad: bool) -> None:
        l2, decay = (0.0, self.weight_decay) if self.decoupled else (self.weight_decay, 0.0)
        self.k.adam_update(self.params.flat, self.params.grad, self.m, self.v, self._block_offsets,
                           self._block_seg, self._block_decay, seg_scale, seg_step,
                           lr, self.beta1, self.beta2, self.eps, l2, decay, self._scale_arg(grad_scale),
                           bool(zero_grad))

    def step(self, lr: Optional[float] = None, grad_scale=1.0, *, loss: Optional[float] = None,
             zero_grad: bool = False) -> None:
        """One update from the grads in `params.grad` times `grad_scale` (a number, or
        clip_scale()'s device array); lr overrides the default for this step. The grads are
        not changed, unless `zero_grad`: then they are left zero for the next backward,
        written in the update's own pass (instead of params.zero_grad()'s separate pass over
        the buffer). `loss` is accepted by every optimizer and used by those that watch it
        (Chuck)."""
        self.step_count += 1
        self._step_host[0] = self.step_count
        self.k.copy_(self._step, self._step_host)
        self._update(self._one, self._step, self.lr if lr is None else lr, grad_scale, zero_grad)


class AdamW(Adam):
    """AdamW (PyTorch's / llm.c's rule): decoupled weight decay, only for parameters
    declared with decay (matrices and embeddings, not biases and norm weights):

        m, v as in Adam on the raw gradient
        p = p - lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)
    """

    decoupled = True

    def __init__(self, params: Params, lr: float = 3e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, betas, eps, weight_decay)


# ============================================================================ Chuck


def tensor_offsets(params: Params) -> np.ndarray:
    """(S+1,) int64: tensor s of the flat buffer is [offsets[s], offsets[s+1]), in storage order."""
    tensors = sorted(params.tensors.values(), key=lambda t: t.offset)
    offsets = np.array([t.offset for t in tensors] + [params.size], dtype=np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) != [t.size for t in tensors]):
        raise ValueError("parameter tensors do not tile the flat buffer")
    return offsets


def block_table(seg_offsets: np.ndarray, decay_mask: Optional[np.ndarray] = None,
                block: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block_offsets (NB+1,) int64, block_seg (NB,) int64, block_decay (NB,) uint8): the
    segments cut into blocks of at most `block` elements (the kernels' parallel tasks) that
    never straddle two segments nor a change of `decay_mask` (one uint8 per element; none:
    no decay anywhere), block_decay[b] being the mask over block b."""
    n = int(seg_offsets[-1])
    if decay_mask is None:
        decay_mask = np.zeros(n, dtype=np.uint8)
    if decay_mask.shape != (n,):
        raise ValueError(f"decay mask has shape {decay_mask.shape}, expected ({n},)")
    changes = np.flatnonzero(np.diff(decay_mask.astype(np.int8))) + 1
    cuts = np.union1d(seg_offsets, changes).astype(np.int64)  # sorted: every run of one segment and flag
    starts, segs = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        seg = int(np.searchsorted(seg_offsets, lo, side="right")) - 1
        for b in range(int(lo), int(hi), block):
            starts.append(b)
            segs.append(seg)
    starts = np.array(starts, dtype=np.int64)
    return (np.append(starts, n).astype(np.int64), np.array(segs, dtype=np.int64),
            (decay_mask[starts] != 0).astype(np.uint8))


def loss_trend(window: np.ndarray) -> tuple[float, float]:
    """(relative slope, oscillation) of losses in chronological order.

    relative slope: the least-squares slope per step divided by the mean |loss|.
    oscillation: the fraction of consecutive loss differences that change sign (0 for a
    monotone run, 1 for a strict zigzag, 2/3 on average for independent noise)."""
    y = np.asarray(window, dtype=np.float64)
    n = y.size
    j = np.arange(n) - (n - 1) / 2.0
    slope = float(np.dot(j, y - y.mean()) / np.dot(j, j)) / max(float(np.mean(np.abs(y))), 1e-30)
    d = np.diff(y)
    osc = float(np.count_nonzero(d[1:] * d[:-1] < 0) / (n - 2))
    return slope, osc


class Chuck(Adam):
    """Chuck: AdamW (decoupled weight decay) that watches the loss and every tensor's gradient.

    Call `step(loss=...)` with the loss whose gradients are in `params.grad`. Mechanisms
    a, c and e watch the smoothed loss L = ema / (1 - loss_beta^t), where
    ema = loss_beta * ema + (1 - loss_beta) * loss (loss_beta 0: the raw loss), because
    minibatch losses are too noisy to judge a trend or a best value on. The step size of
    tensor s is `lr * lr_mult * damp * scale[s]`, where (each mechanism off when its
    switch is 0):

    (a) loss-trend damping (`trend_window` W >= 3, 0 = off). The last W values of L are
        kept. Once W are seen, every step computes their least-squares slope relative
        to their mean |L| and their oscillation (fraction of consecutive differences that
        change sign; see `loss_trend`). Rising (slope > `trend_tol`) or oscillating
        (oscillation > `trend_osc`): damp = max(damp_min, damp * damp_down). Otherwise
        (falling, or flat within trend_tol, and calm): damp = min(1, damp * damp_up).
        damp starts at 1. (Recovering on flat windows too keeps rare false alarms on a
        plateau from ratcheting the lr down for good.)
    (b) per-tensor grad-norm scaling (`gnorm_ratio` R, 0 = off). With n[s] the tensor's
        grad norm this step and a[s] its running average (an EMA with `gnorm_beta`,
        started at the first step's norm and updated after use):
        scale[s] = R * a[s] / n[s] when a[s] > 0 and n[s] > R * a[s], else 1.
    (c) stagnation noise (`noise_patience` N, 0 = off). A step improves when
        L < best - improve_tol * |best| (then best = L). When the steps since the
        last improvement reach N, 2N, 3N, ..., after the update every non-frozen tensor
        gets p += noise_scale * lr_eff * rms(p) * z, z ~ N(0, 1) from the counter-based
        generator (seed, event number): reproducible and resumable.
    (d) freezing (`freeze_patience` M, 0 = off). A tensor whose grad RMS (n[s]/sqrt(size))
        is below `freeze_threshold` for M consecutive steps is frozen: its parameters,
        moments and step count are left untouched (scale 0). The first step its grad RMS
        is back at or above the threshold it is updated again.
    (e) macro patience (`patience` P, 0 = off). When the steps since the last improvement
        reach P, 2P, ...: lr_mult = max(lr_floor, lr_mult * lr_decay). lr_mult starts at 1.

    Each tensor keeps its own Adam step count (bias corrections), which a frozen tensor
    does not advance. Per step: one kernel for the per-tensor grad norms (S numbers read
    back), one update kernel, and on noise steps one norm kernel and one noise kernel.
    """

    decoupled = True
    _hyper = Adam._hyper + (
        "loss_beta", "trend_window", "trend_tol", "trend_osc", "damp_down", "damp_up", "damp_min",
        "gnorm_beta", "gnorm_ratio",
        "noise_patience", "noise_scale", "seed",
        "freeze_threshold", "freeze_patience",
        "patience", "lr_decay", "lr_floor", "improve_tol")
    _scalars = Adam._scalars + ("loss_ema", "damp", "lr_mult", "best_loss", "since_best", "losses_seen",
                                "noise_events", "last_lr")
    _host = ("loss_window", "gnorm_avg", "tiny_count", "tensor_steps")

    def __init__(self, params: Params, lr: float = 3e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *,
                 loss_beta: float = 0.9,
                 trend_window: int = 16, trend_tol: float = 1e-3, trend_osc: float = 0.7,
                 damp_down: float = 0.9, damp_up: float = 1.05, damp_min: float = 0.1,
                 gnorm_beta: float = 0.99, gnorm_ratio: float = 2.0,
                 noise_patience: int = 100, noise_scale: float = 1.0, seed: int = 0,
                 freeze_threshold: float = 1e-8, freeze_patience: int = 20,
                 patience: int = 300, lr_decay: float = 0.5, lr_floor: float = 0.01,
                 improve_tol: float = 1e-3):
        super().__init__(params, lr, betas, eps, weight_decay)
        self._check_own_hyper(loss_beta, trend_window, trend_tol, trend_osc, damp_down, damp_up, damp_min, gnorm_beta,
                              gnorm_ratio, noise_patience, noise_scale, seed, freeze_threshold, freeze_patience,
                              patience, lr_decay, lr_floor, improve_tol)
        self.loss_beta = float(loss_beta)
        self.trend_window, self.trend_tol, self.trend_osc = int(trend_window), float(trend_tol), float(trend_osc)
        self.damp_down, self.damp_up, self.damp_min = float(damp_down), float(damp_up), float(damp_min)
        self.gnorm_beta, self.gnorm_ratio = float(gnorm_beta), float(gnorm_ratio)
        self.noise_patience, self.noise_scale, self.seed = int(noise_patience), float(noise_scale), int(seed)
        self.freeze_threshold, self.freeze_patience = float(freeze_threshold), int(freeze_patience)
        self.patience, self.lr_decay, self.lr_floor = int(patience), float(lr_decay), float(lr_floor)
        self.improve_tol = float(improve_tol)

        self.loss_ema, self.damp, self.lr_mult = 0.0, 1.0, 1.0
        self.best_loss, self.since_best, self.losses_seen = math.inf, 0, 0
        self.noise_events, self.last_lr = 0, 0.0
        self.loss_window = np.zeros(max(self.trend_window, 1), dtype=np.float64)

        S = self._seg_offsets.size - 1
        # names[s] is tensor s, for reading the per-tensor arrays (scale, grad_norms, tensor_steps)
        self.names = [name for name, t in sorted(params.items(), key=lambda kv: kv[1].offset)]
        self._sqrt_sizes = np.sqrt(np.maximum(np.diff(self._seg_offsets), 1)).astype(np.float64)
        self._partial = self._zeros(self._block_seg.shape[0], np.float64)
        self._seg_sumsq = self._zeros(S, np.float64)
        self.gnorm_avg = np.zeros(S, dtype=np.float64)
        self.tiny_count = np.zeros(S, dtype=np.int64)
        self.tensor_steps = np.zeros(S, dtype=np.int64)
        self.scale = np.ones(S, dtype=np.float64)   # this step's per-tensor multiplier (0 = frozen)
        self.grad_norms = np.zeros(S, dtype=np.float64)
        # the kernel reads scale and tensor_steps from these copies, refreshed every step
        # (on a GPU this avoids uploading two new arrays per step; on the CPU they are views)
        self._scale_dev = self.k.to_device(self.scale)
        self._steps_dev = self.k.to_device(self.tensor_steps)

    def _segments(self, params: Params) -> np.ndarray:
        return tensor_offsets(params)

    def _check_hyper(self, lr, beta1, beta2, eps, weight_decay, **own) -> None:
        Adam._check_hyper(self, lr, beta1, beta2, eps, weight_decay)
        self._check_own_hyper(**own)

    @staticmethod
    def _check_own_hyper(loss_beta, trend_window, trend_tol, trend_osc, damp_down, damp_up, damp_min, gnorm_beta,
                         gnorm_ratio, noise_patience, noise_scale, seed, freeze_threshold, freeze_patience, patience,
                         lr_decay, lr_floor, improve_tol) -> None:
        """Chuck's own hyperparameters (a loaded state's too: they size its host arrays)."""
        _check(0 <= loss_beta < 1, f"Chuck: loss_beta must be in [0, 1), got {loss_beta}")
        _check(trend_window == 0 or trend_window >= 3, f"Chuck: trend_window must be 0 (off) or >= 3, got {trend_window}")
        _check(0 < damp_down <= 1 <= damp_up < math.inf and 0 < damp_min <= 1 and 0 <= trend_osc <= 1
               and 0 <= trend_tol < math.inf,
               "Chuck: need 0 < damp_down <= 1 <= damp_up, 0 < damp_min <= 1, 0 <= trend_osc <= 1, trend_tol >= 0")
        _check(0 <= gnorm_beta < 1 and (gnorm_ratio == 0 or 1 <= gnorm_ratio < math.inf),
               "Chuck: need 0 <= gnorm_beta < 1 and gnorm_ratio 0 (off) or >= 1")
        _check(min(noise_patience, freeze_patience, patience, seed) >= 0 and 0 <= noise_scale < math.inf
               and 0 <= freeze_threshold < math.inf,
               "Chuck: patiences, seed, noise_scale, freeze_threshold must be >= 0")
        _check(0 < lr_decay <= 1 and 0 < lr_floor <= 1 and 0 <= improve_tol < math.inf,
               "Chuck: need 0 < lr_decay <= 1, 0 < lr_floor <= 1, improve_tol >= 0")

    def _check_state(self) -> None:
        super()._check_state()
        S = self._sqrt_sizes.size
        for name in ("gnorm_avg", "tiny_count", "tensor_steps"):
            if getattr(self, name).shape != (S,):
                raise ValueError(f"Chuck state {name!r} has shape {getattr(self, name).shape}, "
                                 f"expected ({S},): one entry per parameter tensor")
        if self.loss_window.shape != (max(self.trend_window, 1),):
            raise ValueError(f"Chuck state 'loss_window' has shape {self.loss_window.shape}, "
                             f"expected ({max(self.trend_window, 1)},) for trend_window={self.trend_window}")

    @property
    def _watches_loss(self) -> bool:
        return bool(self.trend_window or self.noise_patience or self.patience)

    def _segment_norms(self, x) -> np.ndarray:
        """Per-tensor L2 norms of a flat buffer: one kernel, S numbers back to the host."""
        self.k.segment_sum_squares(x, self._block_offsets, self._block_seg, self._partial, self._seg_sumsq)
        return np.sqrt(self.k.to_host(self._seg_sumsq))

    def _observe_loss(self, loss: float) -> bool:
        """Mechanisms (a), (c), (e): update damp and lr_mult; True when noise is due."""
        self.loss_ema = self.loss_beta * self.loss_ema + (1.0 - self.loss_beta) * loss
        self.losses_seen += 1
        loss = self.loss_ema / (1.0 - self.loss_beta ** self.losses_seen)
        improved = math.isinf(self.best_loss) or loss < self.best_loss - self.improve_tol * abs(self.best_loss)
        if improved:
            self.best_loss, self.since_best = loss, 0
        else:
            self.since_best += 1
        if self.patience and self.since_best and self.since_best % self.patience == 0:
            self.lr_mult = max(self.lr_floor, self.lr_mult * self.lr_decay)
        if self.trend_window:
            W = self.trend_window
            self.loss_window[(self.losses_seen - 1) % W] = loss
            if self.losses_seen >= W:
                slope, osc = loss_trend(np.roll(self.loss_window, -(self.losses_seen % W)))
                if slope > self.trend_tol or osc > self.trend_osc:
                    self.damp = max(self.damp_min, self.damp * self.damp_down)
                else:
                    self.damp = min(1.0, self.damp * self.damp_up)
        return bool(self.noise_patience and self.since_best and self.since_best % self.noise_patience == 0)

    def _observe_grads(self, norms: np.ndarray) -> None:
        """Mechanisms (b), (d): this step's per-tensor scale (0 = frozen) and running stats."""
        self.scale[:] = 1.0
        if self.gnorm_ratio:
            limit = self.gnorm_ratio * self.gnorm_avg
            big = (self.gnorm_avg > 0) & (norms > limit)
            self.scale[big] = limit[big] / norms[big]
        if self.step_count == 0:
            self.gnorm_avg[:] = norms
        else:
            self.gnorm_avg[:] = self.gnorm_beta * self.gnorm_avg + (1.0 - self.gnorm_beta) * norms
        if self.freeze_patience:
            tiny = norms / self._sqrt_sizes < self.freeze_threshold
            self.tiny_count[:] = np.where(tiny, self.tiny_count + 1, 0)
            self.scale[self.tiny_count >= self.freeze_patience] = 0.0

    def step(self, loss: Optional[float] = None, lr: Optional[float] = None, grad_scale=1.0,
             zero_grad: bool = False) -> None:
        """One update from the grads in `params.grad` times `grad_scale` (a number or
        clip_scale()'s array, whose factor Chuck reads back: its per-tensor rules run on the
        host); `loss` is the loss they came from (needed unless mechanisms a, c and e are
        all off); lr overrides the base lr; zero_grad as in Adam.step."""
        if not isinstance(grad_scale, (int, float, np.integer, np.floating)):
            grad_scale = float(self.k.to_host(self._scale_arg(grad_scale))[0])
        noise_due = False
        if self._watches_loss:
            if loss is None or not math.isfinite(float(loss)):
                raise ValueError(f"Chuck.step needs the finite loss of this step (loss=...), got {loss!r}")
            noise_due = self._observe_loss(float(loss))
        self.grad_norms[:] = self._segment_norms(self.params.grad) * grad_scale
        self._observe_grads(self.grad_norms)
        self.step_count += 1
        self.tensor_steps += self.scale > 0
        lr_eff = (self.lr if lr is None else lr) * self.lr_mult * self.damp
        self.last_lr = lr_eff
        self.k.copy_(self._scale_dev, self.scale)
        self.k.copy_(self._steps_dev, self.tensor_steps)
        self._update(self._scale_dev, self._steps_dev, lr_eff, grad_scale, zero_grad)
        if noise_due:
            sigma = self.noise_scale * lr_eff * self._segment_norms(self.params.flat) / self._sqrt_sizes
            sigma[self.scale == 0] = 0.0
            self.k.add_noise_(self.params.flat, self._block_offsets, self._block_seg, self.k.to_device(sigma),
                              self.seed, self.noise_events)
            self.noise_events += 1

    def stats(self) -> dict:
        """What the last step did, for a training script to print."""
        return {"lr": self.last_lr, "smoothed_loss": self.loss_ema / (1.0 - self.loss_beta ** max(self.losses_seen, 1)),
                "damp": self.damp, "lr_mult": self.lr_mult, "best_loss": self.best_loss,
                "since_best": self.since_best, "frozen": int(np.count_nonzero(self.scale == 0)),
                "scaled": int(np.count_nonzero((self.scale > 0) & (self.scale < 1))),
                "noise_events": self.noise_events}


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "chuck": Chuck}


def make_optimizer(name: str, params: Params, lr: float, weight_decay: float = 0.0,
                   betas=(0.9, 0.95), momentum: float = 0.9) -> Optimizer:
    """The optimizer a training script's --optimizer names, with the script's lr and
    weight decay (SGD takes `momentum`, the Adam family `betas`; Chuck its defaults)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return OPTIMIZERS[name](params, lr=lr, betas=betas, weight_decay=weight_decay)


# ============================================================================ clipping


def _partials(params: Params):
    """The params' scratch for whole-buffer reductions (one float64 per block), made once."""
    if params.norm_partials is None:
        params.norm_partials = params.k.empty(params.k.sum_squares_blocks(params.size), np.float64)
    return params.norm_partials


def grad_norm(params: Params) -> float:
    """The global L2 norm of all gradients (one reduction over the flat grad buffer)."""
    return math.sqrt(params.k.sum_squares(params.grad, _partials(params)))


def clip_factor(params: Params, max_norm: float) -> tuple[float, float]:
    """(global grad norm, the factor that clips it to max_norm: 1 when it is within).

    Pass the factor to the optimizer's step(grad_scale=...) to clip inside the update,
    as llm.c does, instead of clip_grad_norm's extra pass over the grads. A non-finite
    norm gives factor 1 (see GradScaler)."""
    norm = grad_norm(params)
    if math.isfinite(norm) and norm > max_norm > 0:  # the kernels' clip_scale_ has this rule too
        return norm, max_norm / (norm + 1e-6)
    return norm, 1.0


def clip_grad_norm(params: Params, max_norm: float) -> float:
    """Scale all grads so their global norm is at most max_norm; returns the norm before.

    A non-finite norm is returned and the grads are left alone (see GradScaler)."""
    norm, factor = clip_factor(params, max_norm)
    if factor != 1.0:
        params.k.scale_(params.grad, factor)
    return norm


def scale_grads(params: Params, factor: float) -> None:
    """grads *= factor, in place (one kernel)."""
    params.k.scale_(params.grad, factor)


# ============================================================================ loss scaling


class GradScaler:
    """Dynamic loss scaling with a NaN/Inf guard.

    The backward is seeded with `scale` instead of 1, so small grads survive low
    precision; `unscale_()` multiplies the grads by 1/scale and counts non-finite values
    in the same kernel (one integer read back). A step with a non-finite grad is
    skipped: grads are zeroed and the scale is multiplied by `backoff_factor`. After
    `growth_interval` clean steps in a row the scale is multiplied by `growth_factor`
    (0 = never). init_scale=1, backoff_factor=1, growth_interval=0 is a plain NaN guard.

        scaler.backward(model.tape, loss)      # or train_utils.accumulate_grads(..., scaler)
        clip = 1.0
        if scaler.unscale_():                  # optional: to clip the true grads first
            _, clip = clip_factor(model.params, 1.0)
        scaler.step(opt, lr=lr, grad_scale=clip)   # skips opt.step on inf/nan, then update()
    """

    _fields = ("scale", "growth_factor", "backoff_factor", "growth_interval",
               "good_steps", "skipped_steps", "total_steps")

    def __init__(self, params: Params, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        _check(init_scale > 0 and growth_factor >= 1 and 0 < backoff_factor <= 1 and growth_interval >= 0,
               f"GradScaler: invalid init_scale={init_scale} growth_factor={growth_factor} "
               f"backoff_factor={backoff_factor} growth_interval={growth_interval}")
        self.params = params
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0      # clean steps since the last change of scale
        self.skipped_steps = 0
        self.total_steps = 0
        self._seed = np.empty(1, dtype=params.dtype)
        self._finite: Optional[bool] = None  # unscale_() result of the current step

    @property
    def k(self):
        return self.params.k

    def backward(self, tape, loss) -> None:
        """tape.backward(loss) seeded with the current scale (grads come out scaled)."""
        self._seed[0] = self.scale
        tape.backward(loss, self._seed)

    def unscale_(self) -> bool:
        """grads /= scale, in place; True when every grad is finite. Once per step."""
        if self._finite is not None:
            raise RuntimeError("unscale_() was already called this step; call step()/update() first")
        bad = self.k.unscale_check_(self.params.grad, 1.0 / self.scale, _partials(self.params))
        self._finite = bad == 0
        return self._finite

    def step(self, optimizer, **step_kwargs) -> bool:
        """Unscale (unless done), run optimizer.step(**step_kwargs) if the grads are finite,
        then update(). Returns whether the step was taken."""
        finite = self.unscale_() if self._finite is None else self._finite
        if finite:
            optimizer.step(**step_kwargs)
        self.update()
        return finite

    def update(self) -> None:
        """Count the step; on non-finite grads zero them and back off, else maybe grow."""
        if self._finite is None:
            raise RuntimeError("update() before unscale_()/step()")
        self.total_steps += 1
        if self._finite:
            self.good_steps += 1
            if self.growth_interval and self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.params.zero_grad()
            self.skipped_steps += 1
            self.scale *= self.backoff_factor
            self.good_steps = 0
        self._finite = None

    def state_dict(self) -> dict:
        return {"type": "GradScaler", **{name: getattr(self, name) for name in self._fields}}

    def load_state_dict(self, state: dict) -> None:
        """Take a state_dict()'s values, checked as the constructor checks its arguments."""
        if state.get("type") != "GradScaler":
            raise ValueError(f"state is for {state.get('type')!r}, not GradScaler")
        for name in self._fields:
            value, kind = state[name], type(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (kind is int and value != int(value)):
                raise ValueError(f"GradScaler state {name!r} must be a finite number >= 0, got {value!r:.40}")
        _check(state["scale"] > 0 and state["growth_factor"] >= 1 and 0 < state["backoff_factor"] <= 1,
               f"GradScaler state out of range: scale={state['scale']} growth_factor={state['growth_factor']} "
               f"backoff_factor={state['backoff_factor']}")
        for name in self._fields:
            setattr(self, name, type(getattr(self, name))(state[name]))


# ============================================================================ schedules


class LRSchedule:
    """A learning rate per step: linear warmup from lr/warmup to lr over `warmup` steps,
    then the subclass's decay. Stateless but for its hyperparameters, which
    `state_dict()` returns as JSON-ready numbers (`schedule_from_state` rebuilds one)."""

    def __init__(self, lr: float, warmup: int = 0):
        _check(0 <= lr < math.inf and 0 <= warmup < math.inf, f"{type(self).__name__}: invalid lr={lr} warmup={warmup}")
        self.lr, self.warmup = float(lr), int(warmup)

    def __call__(self, step: int) -> float:
        """The learning rate for `step` (counting from 0)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        return self.decayed(step)

    def decayed(self, step: int) -> float:
        """The rate for a step at or after warmup."""
        return self.lr

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, **vars(self)}

    def load_state_dict(self, state: dict) -> None:
        """Take the hyperparameters of a state_dict(), checked by the constructor."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state is for {state.get('type')!r}, not {type(self).__name__}")
        vars(self).update(vars(schedule_from_state(state)))


class ConstantSchedule(LRSchedule):
    """Warmup, then constant lr."""


class CosineSchedule(LRSchedule):
    """Warmup, then cosine decay from lr to lr * min_ratio at `total` steps (constant after)."""

    def __init__(self, lr: float, warmup: int, total: int, min_ratio: float = 0.1):
        super().__init__(lr, warmup)
        _check(0 < total < math.inf and 0 <= min_ratio <= 1, f"CosineSchedule: invalid total={total} min_ratio={min_ratio}")
        self.total, self.min_ratio = int(total), float(min_ratio)

    def decayed(self, step: int) -> float:
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_ratio + (1.0 - self.min_ratio) * coeff)


class LinearSchedule(LRSchedule):
    """Warmup, then linear decay from lr to lr * min_ratio at `total` steps (constant after)."""

    def __init__(self, lr: float, warmup: int, total: int, min_ratio: float = 0.0):
        super().__init__(lr, warmup)
        _check(0 < total < math.inf and 0 <= min_ratio <= 1, f"LinearSchedule: invalid total={total} min_ratio={min_ratio}")
        self.total, self.min_ratio = int(total), float(min_ratio)

    def decayed(self, step: int) -> float:
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.lr * (1.0 - (1.0 - self.min_ratio) * progress)


class StepSchedule(LRSchedule):
    """Warmup, then lr * gamma ** ((step - warmup) // step_size)."""

    def __init__(self, lr: float, warmup: int, step_size: int, gamma: float = 0.1):
        super().__init__(lr, warmup)
        _check(0 < step_size < math.inf and 0 < gamma <= 1, f"StepSchedule: invalid step_size={step_size} gamma={gamma}")
        self.step_size, self.gamma = int(step_size), float(gamma)

    def decayed(self, step: int) -> float:
        return self.lr * self.gamma ** ((step - self.warmup) // self.step_size)


SCHEDULES = {cls.__name__: cls for cls in (ConstantSchedule, CosineSchedule, LinearSchedule, StepSchedule)}


def schedule_from_state(state: dict) -> LRSchedule:
    """Rebuild a schedule from its state_dict()."""
    if state.get("type") not in SCHEDULES:
        raise ValueError(f"unknown schedule {state.get('type')!r}; known: {sorted(SCHEDULES)}")
    # attribute names are the constructor's argument names, so the constructor validates
    values = {k: v for k, v in state.items() if k != "type"}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{state['type']} state {k!r} must be a finite number, got {v!r:.40}")
    return SCHEDULES[state["type"]](**values)
