"""Where a training step spends its time: per-kernel timings and arena sizes.

    with nt.profile.Profiler(model, optimizer) as prof:
        for _ in range(5):
            ...one training step...
    print(prof.table())

While active, the model's device's kernel module is replaced (nt.backend.kernels_replaced)
by a timing proxy, so every kernel call of the tape, the arenas, the KV cache, the
optimizer and the loss scaler is counted and timed by name (on a GPU the proxy
synchronises around each call, so the time is the kernel's, not its launch's). Nothing in
the ops changes, and nothing is timed once the profiler exits.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from .backend import backend, kernels_replaced


class _TimedKernels:
    """Stands in for a kernel module: the same attributes, calls timed into `stats`."""

    def __init__(self, kernels, stats: dict):
        self._kernels = kernels
        self._stats = stats
        self._sync = kernels.synchronize

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._kernels, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def timed(*args, **kwargs):
            if self._sync:
                self._sync()
            t0 = time.perf_counter()
            result = attr(*args, **kwargs)
            if self._sync:
                self._sync()
            entry = self._stats[name]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            return result

        return timed


class Profiler:
    """Times every kernel call of `model` (and `optimizer`) while the `with` block runs."""

    def __init__(self, model, optimizer=None):
        self.model = model
        self.optimizer = optimizer
        self.stats: dict = defaultdict(lambda: [0, 0.0])  # kernel name -> [calls, seconds]
        self.wall = 0.0
        self._swap = None

    def __enter__(self) -> "Profiler":
        device = self.model.tape.device
        self._swap = kernels_replaced(device, _TimedKernels(backend(device), self.stats))
        self._swap.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._t0
        self._swap.__exit__(*exc)
        self._swap = None

    def arena_bytes(self) -> dict:
        """Bytes held by each arena (values and grads) and the optimizer state."""
        t, p = self.model.tape, self.model.params
        sizes = {"params+grads": p.arena.nbytes, "activations+grads": t.acts.nbytes, "saved": t.saved.nbytes}
        if self.optimizer is not None:
            state = self.optimizer.state_dict() if hasattr(self.optimizer, "state_dict") else {}
            sizes["optimizer"] = sum(getattr(v, "nbytes", 0) for v in state.values())
        return sizes

    def table(self) -> str:
        """Kernels by total time: calls, ms in total and per call, share of the wall time."""
        lines = [f"{'kernel':<26} {'calls':>7} {'total ms':>10} {'ms/call':>9} {'share':>6}"]
        for name, (calls, secs) in sorted(self.stats.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{name:<26} {calls:>7} {secs * 1e3:>10.1f} {secs * 1e3 / calls:>9.3f} "
                         f"{secs / self.wall:>6.1%}")
        kernel_time = sum(s for _, s in self.stats.values())
        lines.append(f"{'(kernels)':<26} {'':>7} {kernel_time * 1e3:>10.1f} {'':>9} {kernel_time / self.wall:>6.1%}")
        lines.append(f"{'(wall)':<26} {'':>7} {self.wall * 1e3:>10.1f}")
        for name, nbytes in self.arena_bytes().items():
            lines.append(f"arena {name:<20} {nbytes / 2 ** 20:>10.1f} MiB")
        return "\n".join(lines)
