"""Device -> kernel module. Ops call kernels through this and never branch on device.

This module is the one owner of the kernel modules: tapes, arenas, parameters, optimizers
and KV caches hold a device name and look their kernels up here on each use, so swapping
a device's kernels (the profiler's timing proxy) is one assignment that reaches them all.
"""
import contextlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Iterator

DEVICES = ("cpu", "cuda")
_ACTIVE: dict = {}   # device -> the kernel module (or a stand-in) in use


def _defer_scipy_linalg() -> None:
    """Make `scipy.linalg` a package whose body runs on first use.

    Numba's CPU target, started by the first kernel call (even one loaded from the cache),
    checks that np.dot can work with `import scipy.linalg.cython_blas`. That import runs
    scipy.linalg's __init__: all of scipy.linalg and, through scipy._lib, numpy.f2py,
    numpy.testing, unittest, pydoc..., ~140 modules and 13 MiB of resident memory (4% of
    the default training run's peak) that nt never uses (kernels/cpu/blas.py opens SciPy's
    OpenBLAS itself). The package module is made here without running its body; its
    extension submodules (cython_blas) import without it; the body runs, in the same module
    object, the first time anything asks the package for an attribute it lacks, so
    `scipy.linalg.solve` or `from scipy.linalg import lu` work as usual."""
    if "scipy.linalg" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("scipy.linalg")
    except ImportError:   # no SciPy: Numba's check fails the same way without this
        return
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)

    def load(name: str):
        del package.__dict__["__getattr__"]   # from now on the package's own attributes
        try:
            spec.loader.exec_module(package)
        except BaseException:
            sys.modules.pop("scipy.linalg", None)   # as a failed import leaves it: absent
            raise
        return getattr(package, name)

    package.__getattr__ = load
    sys.modules["scipy.linalg"] = package


_defer_scipy_linalg()


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
