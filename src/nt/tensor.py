"""Tensors are small handles into arenas: one flat buffer for values, one for grads.

An `Arena` is a bump allocator over one contiguous buffer (and, for parameters, a second
buffer with the same layout for their grads). An `ActivationArena` holds op outputs; their
grads live in a buffer planned at each backward, where a grad occupies memory only while
it is alive. A `Tensor` is (arena, offset, shape); its `.data` and `.grad` are views made
on demand, so an arena may grow during the first step without invalidating the handles
made before. Growing never copies: a full arena takes a further segment for what comes
next and merges its segments into one buffer when it is rewound (reset), when their
contents are dead, so the first step never holds an old and a new copy of the arena.
"""
from __future__ import annotations

import bisect
import ctypes
import math
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .backend import backend

ALIGN = 16  # elements; keeps every tensor 64-byte aligned in float32


def _unmap_freed_buffers() -> None:
    """glibc raises its mmap threshold each time a big buffer is freed, after which buffers
    up to that size come from the heap, whose freed middle is never handed back: an arena's
    merged segments would stay resident. A fixed threshold (1 MiB) gives every big buffer its
    own mapping, returned to the OS when freed. Steady steps allocate nothing, so the
    mapping cost is paid only while arenas are sized."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)   # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):   # not glibc: nothing to tune
        pass


_unmap_freed_buffers()


class Arena:
    """A growable, reusable bump allocator over one flat buffer (plus its grad mirror)."""

    def __init__(self, device: str, dtype, with_grad: bool, name: str):
        self.device = device
        self.dtype = np.dtype(dtype)
        self.with_grad = with_grad
        self.name = name
        self.buf = self.k.empty(0, self.dtype)
        self._gbuf = None   # the grad mirror of buf, made on first use (see gbuf)
        self.top = 0      # next free element
        self.high = 0     # the highest top since the buffers were last merged
        self.grows = 0    # how many times the buffers were reallocated (a steady step: none)
        # segments beyond buf made while growing, (start, values, grads): each holds the
        # elements from its start up to the next one's (the last: to its end)
        self.more: list[tuple] = []
        # (id(buffer), offset, shape) -> view: a GPU array view costs tens of microseconds
        # to build and a step asks for the same views every time; emptied when a buffer moves
        self.views: dict = {}

    @property
    def gbuf(self):
        """The grads of buf (None without grads), made zeroed on first use: a model that
        never runs a backward (inference, evaluation) never pays for a buffer as large as
        its parameters, neither in memory nor in the pass that zeroes it."""
        if self._gbuf is None and self.with_grad:
            self._gbuf = self.k.empty(self.buf.shape[0], self.dtype)
            self.k.fill_(self._gbuf, 0.0)
        return self._gbuf

    @gbuf.setter
    def gbuf(self, value) -> None:
        self._gbuf = value

    def view(self, buf, offset: int, shape: tuple):
        """buf[offset:offset + prod(shape)] reshaped to shape (buf is self.buf or self.gbuf), cached."""
        key = (id(buf), offset, shape)
        v = self.views.get(key)
        if v is None:
            if len(self.views) >= 65536:  # shapes that change every call (a growing decode): start over
                self.views.clear()
            v = self.views[key] = buf[offset:offset + math.prod(shape)].reshape(shape)
        return v

    @property
    def k(self):
        """The device's kernel module (nt.backend owns it)."""
        return backend(self.device)

    def alloc(self, shape: Sequence[int]) -> "Tensor":
        """A new tensor of `shape` at the top of the arena (contents undefined)."""
        shape = tuple(int(s) for s in shape)
        size = math.prod(shape)
        offset = self.top
        self.top = offset + (size + ALIGN - 1) // ALIGN * ALIGN
        self.high = max(self.high, self.top)
        last_start, last, _ = self.more[-1] if self.more else (0, self.buf, None)
        if self.top > last_start + last.shape[0]:
            self._grow(offset)
        return Tensor(self, offset, shape)

    def _grow(self, offset: int) -> None:
        """Room for elements [offset, top) without moving any before: an empty arena gets its
        buffer, a used one a new segment from `offset` (the last segment's unused tail stays
        untouched, so it costs no resident memory) at least as large as all before it."""
        if self.buf.shape[0] == 0 and offset == 0:
            self.buf = self.k.empty(self.top, self.dtype)
            if self.with_grad:
                self._gbuf = None   # its grads: made when first used
        else:
            size = max(self.top - offset, offset)
            self.more.append((offset, self.k.empty(size, self.dtype),
                              self.k.empty(size, self.dtype) if self.with_grad else None))
        self.grows += 1

    def _segment(self, offset: int) -> tuple:
        """(start, values, grads) of the buffer holding element `offset`."""
        for seg in reversed(self.more):
            if seg[0] <= offset:
                return seg
        return 0, self.buf, self.gbuf

    def values(self, offset: int, shape: tuple):
        """The values of elements [offset, offset + prod(shape)), shaped (a cached view)."""
        start, buf, _ = self._segment(offset) if self.more else (0, self.buf, None)
        return self.view(buf, offset - start, shape)

    def reset(self) -> None:
        """Rewind: the next allocations reuse the same memory at the same offsets. After a
        step that grew, the segments (whose contents are now dead) become one buffer of
        the step's size, freed before it is made."""
        self.top = 0
        if self.more:
            self.more.clear()
            self.views.clear()
            self.buf = None
            if self.with_grad:
                self._gbuf = None   # made again, at the new size, when first used
            self.buf = self.k.empty(self.high, self.dtype)

    def grad_view(self, offset: int, size: int):
        """The grad of elements [offset, offset + size): the mirror's, or None without grads."""
        if not self.with_grad:
            return None
        start, _, gbuf = self._segment(offset) if self.more else (0, None, self.gbuf)
        return self.view(gbuf, offset - start, (size,))

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the arena holds (values and grads)."""
        values = self.buf.shape[0] + sum(seg[1].shape[0] for seg in self.more)
        grads = 0 if self._gbuf is None else self._gbuf.shape[0]   # made yet or not
        grads += sum(seg[2].shape[0] for seg in self.more if seg[2] is not None)
        return (values + grads) * self.dtype.itemsize


class ActivationArena(Arena):
    """The tape's arena for op outputs, with grads that do not mirror it.

    An activation's grad is needed only from the backward of the last op that reads the
    activation (the first backward to run that touches it) to the backward of the op
    that made it. `plan_grads`, called by Tape.backward with what each backward touches,
    gives each allocation a grad slot for exactly that stretch and hands the slot on when
    it dies (first fit), so the grad buffer holds the most grads alive at once instead of
    one per activation; the plan is the same every step of the same shapes, so a steady
    step grows nothing. Grads exist only during backward(): read them there.
    """

    def __init__(self, device: str, dtype, name: str):
        super().__init__(device, dtype, with_grad=False, name=name)
        self.gbuf = self.k.empty(0, self.dtype)
        self.starts: list[int] = []      # offset of every allocation since the last reset, ascending
        self.gstarts: Optional[list[int]] = None   # each allocation's grad offset in gbuf, once planned

    def alloc(self, shape: Sequence[int]) -> "Tensor":
        t = super().alloc(shape)
        self.starts.append(t.offset)
        self.gstarts = None
        return t

    def reset(self) -> None:
        super().reset()
        self.starts.clear()
        self.gstarts = None

    def block(self, offset: int) -> int:
        """The allocation that holds element `offset` (views share their allocation's grad)."""
        return bisect.bisect_right(self.starts, offset) - 1

    def block_span(self, i: int) -> tuple[int, int]:
        """(grad offset, size) of allocation i's grad slot."""
        end = self.starts[i + 1] if i + 1 < len(self.starts) else self.top
        return self.gstarts[i], end - self.starts[i]

    def grad_view(self, offset: int, size: int):
        if self.gstarts is None:
            raise RuntimeError("activation grads exist only while tape.backward() runs (they share memory); "
                               "read a parameter's grad, or an activation's inside a backward")
        i = self.block(offset)
        return self.view(self.gbuf, self.gstarts[i] + offset - self.starts[i], (size,))

    def plan_grads(self, touches: Sequence[Sequence[int]]) -> list[list[int]]:
        """Give every allocation in `touches` a grad slot. touches[s] lists the allocations
        whose grads step s of the backward reads or writes (step 0 seeds the output's grad,
        then the recorded ops in backward order). A slot is live from the first step that
        touches its allocation to the last; dead slots are reused. Returns, per step, the
        allocations whose slots must be zeroed before it (grads accumulate with +=)."""
        n = len(self.starts)
        first, last = [-1] * n, [-1] * n
        for s, blocks in enumerate(touches):
            for i in blocks:
                if first[i] < 0:
                    first[i] = s
                last[i] = s
        sizes = [(self.starts[i + 1] if i + 1 < n else self.top) - self.starts[i] for i in range(n)]
        born: list[list[int]] = [[] for _ in touches]
        dies: list[list[int]] = [[] for _ in touches]
        for i in range(n):
            if first[i] >= 0:
                born[first[i]].append(i)
                dies[last[i]].append(i)
        gstarts = [0] * n
        free: list[list[int]] = []   # [start, size] of dead slots, by start
        end = 0
        for s in range(len(touches)):
            for i in born[s]:
                gstarts[i], end = _take(free, sizes[i], end)
            for i in dies[s]:
                _give(free, gstarts[i], sizes[i])
        if end > self.gbuf.shape[0]:
            size = max(end, 2 * self.gbuf.shape[0])
            self.gbuf = None   # planned anew each backward: nothing to keep, free it first
            self.gbuf = self.k.empty(size, self.dtype)
            self.views.clear()
            self.grows += 1
        self.gstarts = gstarts
        return born


def _take(free: list, size: int, end: int) -> tuple[int, int]:
    """A slot of `size` from the first dead slot that fits, else from the end; (start, new end)."""
    for j, (start, room) in enumerate(free):
        if room >= size:
            if room == size:
                free.pop(j)
            else:
                free[j] = [start + size, room - size]
            return start, end
    return end, end + size


def _give(free: list, start: int, size: int) -> None:
    """Return a slot to the dead list, merged with its neighbours."""
    j = bisect.bisect_left(free, [start, size])
    free.insert(j, [start, size])
    if j + 1 < len(free) and free[j][0] + free[j][1] == free[j + 1][0]:
        free[j][1] += free.pop(j + 1)[1]
    if j > 0 and free[j - 1][0] + free[j - 1][1] == free[j][0]:
        free[j - 1][1] += free.pop(j)[1]


class Tensor:
    """A handle on `prod(shape)` elements at `offset` of an arena's buffers."""

    __slots__ = ("arena", "offset", "shape", "size")

    def __init__(self, arena: Arena, offset: int, shape: tuple):
        self.arena = arena
        self.offset = offset
        self.shape = shape
        self.size = math.prod(shape)

    @property
    def data(self):
        """The values, as a view of the arena with this tensor's shape (cached by the arena)."""
        return self.arena.values(self.offset, self.shape)

    @property
    def grad(self):
        """The gradient, same shape; None when the arena keeps no grads (a frozen parameter)."""
        view = self.arena.grad_view(self.offset, self.size)
        return None if view is None else self.arena.view(view, 0, self.shape)

    @property
    def flat(self):
        return self.arena.values(self.offset, (self.size,))

    @property
    def gflat(self):
        return self.arena.grad_view(self.offset, self.size)

    @property
    def dtype(self) -> np.dtype:
        return self.arena.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        """The values as a NumPy array: a view on the CPU, a copy from a GPU."""
        return self.arena.k.to_host(self.data)

    def __getitem__(self, i: int) -> "Tensor":
        """The i-th slice along the first axis (e.g. one layer of a stacked weight)."""
        n = self.shape[0]
        if not (isinstance(i, (int, np.integer)) and -n <= i < n):
            raise IndexError(f"index {i!r} out of range for a tensor of shape {self.shape}")
        i = int(i) % n
        inner = self.size // n
        return Tensor(self.arena, self.offset + i * inner, self.shape[1:])

    def view(self, *shape: int) -> "Tensor":
        """The same elements with another shape (no copy)."""
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot view a tensor of shape {self.shape} as {shape}")
        return Tensor(self.arena, self.offset, tuple(shape))

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, arena={self.arena.name}@{self.offset})"


class Params:
    """A model's parameters. The trainable ones live in ONE contiguous buffer with a grad
    mirror, so zeroing grads is one fill, the optimizer one kernel over `params.flat` and
    clipping one reduction; frozen ones (if any) live in a second buffer with no grads at
    all, so they cost no grad or optimizer memory and no backward writes to them.

    `layout` lists (name, shape, decay) in canonical order (GPT-2: llm.c's file order);
    `trainable` names the trainable parameters (None: all of them). `params[name]` is the
    tensor wherever it lives; `load_flat` / `to_flat` move every value in canonical order
    (`offsets[name]` is a parameter's place in that order), which is the trainable buffer
    itself when nothing is frozen.
    """

    def __init__(self, device: str, dtype, layout: Sequence[tuple[str, tuple, bool]],
                 trainable: Optional[Iterable[str]] = None):
        self.layout = [(name, tuple(int(s) for s in shape), bool(decay)) for name, shape, decay in layout]
        names = [name for name, _, _ in self.layout]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"parameters declared twice: {twice}")
        if trainable is not None:
            trainable = set(trainable)
            unknown = trainable - set(names)
            if unknown:
                raise ValueError(f"no parameters named {sorted(unknown)}; have {names}")
        self.arena = Arena(device, dtype, with_grad=True, name="params")
        self.frozen = Arena(device, dtype, with_grad=False, name="frozen")
        self.tensors: dict[str, Tensor] = {}
        self.decay: dict[str, bool] = {}
        self.offsets: dict[str, int] = {}
        total = 0
        for name, shape, decay in self.layout:
            arena = self.arena if trainable is None or name in trainable else self.frozen
            # packed without alignment gaps: with nothing frozen the buffer is exactly the checkpoint
            t = Tensor(arena, arena.top, shape)
            arena.top += t.size
            self.tensors[name] = t
            self.decay[name] = decay
            self.offsets[name] = total
            total += t.size
        self.numel = total            # every parameter, trainable or not
        self.size = self.arena.top    # trainable elements: the length of flat and grad
        for arena in (self.arena, self.frozen):
            arena._grow(0)
            self.k.fill_(arena.buf, 0.0)
        self.norm_partials = None  # scratch for grad-norm reductions, made on first use

    @property
    def device(self) -> str:
        return self.arena.device

    @property
    def k(self):
        """The device's kernel module (nt.backend owns it)."""
        return self.arena.k

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r}; have {list(self.tensors)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def items(self):
        return self.tensors.items()

    @property
    def trainable(self) -> list[str]:
        """Names of the trainable parameters, in canonical order."""
        return [name for name, t in self.tensors.items() if t.arena is self.arena]

    @property
    def flat(self):
        """Every trainable parameter value, one flat buffer."""
        return self.arena.buf[:self.size]

    @property
    def grad(self):
        """Every trainable parameter's gradient, one flat buffer laid out like `flat`."""
        return self.arena.gbuf[:self.size]

    @property
    def dtype(self) -> np.dtype:
        return self.arena.dtype

    def zero_grad(self) -> None:
        """Set every grad to zero (nothing to do while the grads are not made: they start at zero)."""
        if self.arena._gbuf is not None:
            self.k.fill_(self.grad, 0.0)

    def decay_mask(self) -> np.ndarray:
        """uint8 per element of `flat`: 1 where weight decay applies (host array)."""
        mask = np.zeros(self.size, dtype=np.uint8)
        for name, t in self.tensors.items():
            if self.decay[name] and t.arena is self.arena:
                mask[t.offset:t.offset + t.size] = 1
        return mask

    def load_flat(self, values: np.ndarray) -> None:
        """Set every parameter from one host array in canonical order (`offsets`)."""
        if values.shape != (self.numel,):
            raise ValueError(f"expected {self.numel} parameter values, got shape {values.shape}")
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self.size == self.numel:  # nothing frozen: the trainable buffer is the canonical order
            self.k.copy_(self.flat, self.k.to_device(values))
            return
        for name, t in self.tensors.items():
            o = self.offsets[name]
            self.k.copy_(t.flat, self.k.to_device(values[o:o + t.size]))

    def init_(self, name: str, value: float = 0.0, std: float = 0.0, rng: Optional[np.random.Generator] = None,
              zero_rows_from: Optional[int] = None) -> None:
        """Set parameter `name` to `value`, or (std > 0) to rng.normal(0, std, shape), drawn a
        chunk at a time: the same values as one call, without a float64 copy of the whole
        tensor (a model's init would otherwise hold one of every parameter: 1 GB at 124M).
        Rows from `zero_rows_from` on are then zeroed (a padded vocabulary)."""
        t = self[name]
        flat, k = t.flat, self.k
        chunk = 1 << 20
        for i in range(0, t.size, chunk):
            n = min(chunk, t.size - i)
            piece = rng.normal(0.0, std, n) if std > 0 else np.full(n, value)
            k.copy_(flat[i:i + n], k.to_device(piece.astype(self.dtype)))
        if zero_rows_from is not None:
            k.fill_(flat[zero_rows_from * (t.size // t.shape[0]):], 0.0)

    def to_flat(self) -> np.ndarray:
        """Every parameter value as one host array in canonical order (a copy)."""
        if self.size == self.numel:
            return np.array(self.k.to_host(self.flat))
        out = np.empty(self.numel, dtype=self.dtype)
        for name, t in self.tensors.items():
            o = self.offsets[name]
            out[o:o + t.size] = self.k.to_host(t.flat)
        return out

    def with_trainable(self, trainable: Optional[Iterable[str]]) -> "Params":
        """New Params with the same layout and values where only `trainable` (None: all)
        get grads; grads are not carried over. This Params' grads are released first (else
        old values + old grads + new values is the build's peak, above a LoRA step's), so
        afterwards it behaves as all frozen: use the returned one."""
        self.arena.gbuf, self.arena.with_grad = None, False
        self.arena.views.clear()
        new = Params(self.device, self.dtype, self.layout, trainable)
        for name, t in self.tensors.items():
            self.k.copy_(new.tensors[name].flat, t.flat)
        return new
