"""The tape: records ops during the forward, replays their backwards in reverse.

A tape owns two arenas: `acts` for op outputs (with a grad mirror) and `saved` for what
backwards need but nobody differentiates (layernorm statistics, attention log-sum-exps).
`reset()` rewinds both, so a step with the same shapes as the last one reuses the same
memory at the same offsets and allocates nothing. A third buffer, `work`, is scratch that
one kernel call at a time may use (attention's score blocks); kernels run one after
another, so every op shares it.

A CUDA tape may run its matmuls in bf16 mixed precision (`precision="bf16"`, docs/cuda.md):
the float32 parameters stay the master copy, each weight's bf16 copy is rounded once per
forward, activations and their grads are rounded to bf16 as matmul operands, and every
GEMM accumulates in float32 into float32 outputs and grads.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .backend import backend
from .tensor import ActivationArena, Arena, Tensor


PRECISIONS = ("fp32", "bf16")


class _Bf16Kernels:
    """The kernels a bf16 tape's ops call: the device's own (looked up on every use, so
    the profiler's stand-in still sees them), except that the two matmul entry points take
    bf16 operands with float32 accumulation, reading the weights' bf16 copies."""

    def __init__(self, tape: "Tape"):
        from nt.kernels.cuda import bf16, matmul   # the tape checked the device is cuda
        self.device = tape.device
        self.tape = tape
        self.shadows = bf16.Shadows()
        self._bf16 = bf16
        self._matmul = matmul

    def __getattr__(self, name):
        return getattr(backend(self.device), name)

    def _copies(self, weight):
        """The weights' kept bf16 copies, or None for a weight in the tape's scratch (a matrix
        dequantised there for one call, whose memory the next one reuses): rounded at each use."""
        work = self.tape._work
        start = self._bf16.address(work)
        inside = start <= self._bf16.address(weight) < start + work.shape[0] * work.dtype.itemsize
        return None if inside else self.shadows

    def matmul_forward(self, out, inp, weight, bias, transposed=False):
        self._matmul.matmul_forward_bf16(out, inp, weight, bias, transposed, self._copies(weight))

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, transposed=False):
        self._matmul.matmul_backward_bf16(dinp, dweight, dbias, dout, inp, weight, transposed, self._copies(weight))


class Tape:
    """Records ops in order; `backward(out)` runs their backward kernels in reverse."""

    def __init__(self, device: str = "cpu", dtype=np.float32, precision: str = "fp32"):
        backend(device)  # an unknown or unavailable device fails here
        self.device = device
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"tape dtype must be float32 or float64, got {self.dtype}")
        self._bf16: Optional[_Bf16Kernels] = None
        self.set_precision(precision)
        self.acts = ActivationArena(device, self.dtype, name="acts")
        self.saved = Arena(device, self.dtype, with_grad=False, name="saved")
        # the forward's integer inputs (token ids, targets), copied in as llm.c copies its
        # inputs: a caller may reuse its arrays before the backward reads them
        self.ints = Arena(device, np.int32, with_grad=False, name="ints")
        self._work = self.k.empty(0, self.dtype)
        self.records: list[tuple] = []
        self.recording = True
        # dropout: active only while training; its masks are a pure function of
        # (seed, step, index of the dropout call in this forward, element index)
        self.training = True
        self.seed = 0
        self.step = 0
        self.rng_calls = 0

    @property
    def precision(self) -> str:
        """"fp32": every op in the tape's dtype; "bf16": matmuls with bf16 operands (CUDA)."""
        return "fp32" if self._bf16 is None else "bf16"

    def set_precision(self, precision: str) -> None:
        """Choose how matmuls compute: "fp32" (in the tape's dtype, the default) or "bf16"
        (mixed precision on CUDA: bf16 operands, float32 accumulation, outputs, grads and
        master weights; the other kernels stay float32). A model's tape is switched with
        `model.tape.set_precision("bf16")`."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bf16" and (self.device != "cuda" or self.dtype != np.float32):
            raise ValueError(f"bf16 mixed precision runs on CUDA with a float32 tape (float32 master weights, "
                             f"bf16 matmul operands); this tape is {self.device} {self.dtype}: use "
                             f"precision='fp32' here (the CPU backend has no bf16 matmul)")
        if precision != self.precision:
            self._bf16 = _Bf16Kernels(self) if precision == "bf16" else None

    def reset(self, recording: bool = True) -> None:
        """Forget the recorded ops and rewind the arenas for the next forward.

        With `recording=False` ops still run but record nothing (inference). A bf16 tape
        rounds its weights' bf16 copies again for this forward (the weights may have changed).
        """
        if self._bf16 is not None:
            self._bf16.shadows.stale()
        self.acts.reset()
        self.saved.reset()
        self.ints.reset()
        self.records.clear()
        self.recording = recording
        self.rng_calls = 0

    def begin_forward(self, recording: bool = True) -> None:
        """What a model does before each forward: in training mode a recorded forward gets
        the next dropout step (fresh masks), then the arenas rewind (reset)."""
        if self.training and recording:
            self.step += 1
        self.reset(recording)

    @property
    def k(self):
        """The device's kernel module (nt.backend owns it), or its bf16 variant."""
        return backend(self.device) if self._bf16 is None else self._bf16

    def rng_key(self) -> int:
        """A fresh 64-bit key for the next random op of this forward (dropout), derived
        from (seed, step, call index): the same forward at the same step draws the same."""
        key = (self.seed * 0x9E3779B97F4A7C15 + self.step * 0xD1B54A32D192ED03
               + self.rng_calls * 0x8CB92BA72F3D8DD7) % 2 ** 64
        self.rng_calls += 1
        return key

    def new(self, shape) -> Tensor:
        """Space for an op output (it gets a grad slot)."""
        return self.acts.alloc(shape)

    def new_saved(self, shape) -> Tensor:
        """Space for something a backward needs and nothing differentiates."""
        return self.saved.alloc(shape)

    def keep_ids(self, ids: np.ndarray) -> Tensor:
        """A tape-owned int32 copy of validated integer inputs (token ids, targets): the
        backward reads this copy, never the caller's array, which it may reuse."""
        kept = self.ints.alloc(ids.shape)
        self.k.copy_(kept.data, ids if ids.dtype == np.int32 else ids.astype(np.int32))
        return kept

    def work(self, shape):
        """Scratch of `shape` for one kernel call, forward or backward (contents undefined,
        shared with every other op): grows on first use, then is the same memory."""
        size = math.prod(shape)
        if size > self._work.shape[0]:
            self._work = self.k.empty(size, self.dtype)
        return self._work[:size].reshape(shape)

    def record(self, backward_fn: Callable, *args) -> None:
        """Remember that `backward_fn(kernels, *args)` must run during the backward."""
        if self.recording:
            self.records.append((backward_fn, args))

    def backward(self, out: Tensor, grad: Optional[np.ndarray] = None) -> None:
        """Backpropagate from `out`, seeding its grad with ones (or `grad`).

        Activation grads start at zero and share memory as their lifetimes allow
        (ActivationArena.plan_grads); parameter grads ACCUMULATE (call the model's or
        params' zero_grad() between steps, or not, to accumulate micro-batches).
        """
        if not self.recording:
            raise RuntimeError("this forward ran without recording; call tape.reset() "
                               "(recording=True) before the forward you want to differentiate")
        if out.arena is not self.acts:
            raise ValueError("backward() needs a tensor produced on this tape")
        if grad is not None:
            grad = np.asarray(grad, dtype=self.dtype)
            if grad.shape != out.shape:
                raise ValueError(f"seed grad has shape {grad.shape}, output has {out.shape}")
        steps = list(reversed(self.records))
        touches = [[self.acts.block(out.offset)]] + [self._touched(args) for _, args in steps]
        zero_before = self.acts.plan_grads(touches)
        for s, step in enumerate([None] + steps):
            for i in zero_before[s]:
                g, size = self.acts.block_span(i)
                self.k.fill_(self.acts.gbuf[g:g + size], 0.0)
            if step is None:   # step 0: seed the output's grad
                if grad is None:
                    self.k.fill_(out.gflat, 1.0)
                else:
                    self.k.copy_(out.gflat, grad.reshape(-1))  # copy_ takes a host array: nothing allocated
            else:
                backward_fn, args = step
                backward_fn(self.k, *args)

    def _touched(self, args) -> list[int]:
        """The activation allocations a recorded backward reads or writes grads of: every
        activation Tensor among its arguments (and inside argument tuples)."""
        blocks = []
        for a in args:
            for t in (a if isinstance(a, (tuple, list)) else (a,)):
                if isinstance(t, Tensor) and t.arena is self.acts:
                    blocks.append(self.acts.block(t.offset))
        return blocks
