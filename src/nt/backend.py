"""Device -> kernel module. Ops call kernels through this and never branch on device.

This module is the one owner of the kernel modules: tapes, arenas, parameters, optimizers
and KV caches hold a device name and look their kernels up here on each use, so swapping
a device's kernels (the profiler's timing proxy) is one assignment that reaches them all.
"""
import contextlib
import importlib
from types import ModuleType
from typing import Iterator

DEVICES = ("cpu", "cuda")
_ACTIVE: dict = {}   # device -> the kernel module (or a stand-in) in use


def backend(device: str = "cpu") -> ModuleType:
    """The kernel module for `device`: `nt.kernels.cpu` or `nt.kernels.cuda`.

    Both expose the same functions with the same signatures (the `*_forward` /
    `*_backward` kernels plus `empty`, `fill_`, `copy_`, `to_host`, `to_device`,
    `synchronize`).
    """
    kernels = _ACTIVE.get(device)
    if kernels is not None:
        return kernels
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    try:
        kernels = importlib.import_module(f"nt.kernels.{device}")
    except ImportError as e:
        if device == "cuda":
            raise RuntimeError(
                "the CUDA backend needs numba-cuda and an NVIDIA driver: "
                "pip install 'nt[cuda]' (or set NUMBA_ENABLE_CUDASIM=1 to simulate)") from e
        raise
    _ACTIVE[device] = kernels
    return kernels


@contextlib.contextmanager
def kernels_replaced(device: str, stand_in) -> Iterator[None]:
    """Route every kernel call for `device` through `stand_in` (an object with the kernel
    module's attributes) while the `with` block runs."""
    original = backend(device)
    _ACTIVE[device] = stand_in
    try:
        yield
    finally:
        _ACTIVE[device] = original
