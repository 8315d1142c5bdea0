"""Shared test helpers: run an op on a fresh tape, check its backward by finite differences,
import a repository script."""
from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
from numba.core.runtime import _nrt_python, rtsys

import nt
from nt import Params, Tape

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str, name: str) -> ModuleType:
    """The repository's script at `path` (e.g. "train/train_gpt2.py") imported as module
    `name`, so a test can call its main() or parse_args() in process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_params(arrays: dict[str, np.ndarray], dtype=np.float64, device: str = "cpu") -> Params:
    """Params holding copies of `arrays` (so every input has a grad slot)."""
    params = Params(device, dtype, [(name, a.shape, False) for name, a in arrays.items()])
    for name, a in arrays.items():
        params[name].data[...] = a
    return params


def measure_step_allocations(monkeypatch, kernels, step: Callable) -> tuple[int, int, int]:
    """Run step() once with every Numba kernel of the backend module `kernels` counting the
    arrays handed to it. Returns (array arguments, Numba runtime allocations, peak bytes of
    new Python memory). Numba's runtime records one small MemInfo per NumPy array passed
    into a kernel, so a step whose kernels allocate nothing has the two counts equal."""
    array_args = [0]
    for name in dir(kernels):
        fn = getattr(kernels, name)
        if hasattr(fn, "py_func"):  # a Numba kernel
            def counting(*args, fn=fn):
                array_args[0] += sum(isinstance(a, np.ndarray) for a in args)
                return fn(*args)
            monkeypatch.setattr(kernels, name, counting)
    _nrt_python.memsys_enable_stats()
    nrt_before = rtsys.get_allocation_stats()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return array_args[0], rtsys.get_allocation_stats().alloc - nrt_before.alloc, peak - base


def run_op(build: Callable, arrays: dict[str, np.ndarray], dtype=np.float64):
    """Run build(tape, params) once; returns (tape, params, out tensor)."""
    params = make_params(arrays, dtype)
    tape = Tape("cpu", dtype)
    out = build(tape, params)
    return tape, params, out


def check_grads(build: Callable, arrays: dict[str, np.ndarray], seed: int = 0, h: float = 1e-6,
                rtol: float = 1e-6, atol: float = 1e-8, max_checks: int = 400) -> None:
    """Compare the tape's float64 gradients of sum(out * dout) with central differences.

    Every input element is checked when there are at most `max_checks` of them, else a
    random subset of that many.
    """
    rng = np.random.default_rng(seed)
    tape, params, out = run_op(build, arrays)
    dout = rng.standard_normal(out.shape)
    params.zero_grad()
    tape.backward(out, dout)
    analytic = params.grad.copy()

    def objective() -> float:
        tape.reset()
        return float(np.sum(build(tape, params).data * dout))

    flat = params.flat
    indices = np.arange(flat.size) if flat.size <= max_checks else rng.choice(flat.size, max_checks, replace=False)
    numeric = np.empty(indices.size)
    for j, i in enumerate(indices):
        old = flat[i]
        flat[i] = old + h
        plus = objective()
        flat[i] = old - h
        minus = objective()
        flat[i] = old
        numeric[j] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(analytic[indices], numeric, rtol=rtol, atol=atol)
