"""Device -> kernel module. Ops call kernels through this and never branch on device."""
import importlib
from types import ModuleType

DEVICES = ("cpu", "cuda")


def backend(device: str = "cpu") -> ModuleType:
    """The kernel module for `device`: `nt.kernels.cpu` or `nt.kernels.cuda`.

    Both expose the same functions with the same signatures (the `*_forward` /
    `*_backward` kernels plus `empty`, `fill_`, `copy_`, `to_host`, `to_device`).
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    try:
        return importlib.import_module(f"nt.kernels.{device}")
    except ImportError as e:
        if device == "cuda":
            raise RuntimeError(
                "the CUDA backend needs numba-cuda and an NVIDIA driver: "
                "pip install 'nt[cuda]' (or set NUMBA_ENABLE_CUDASIM=1 to simulate)") from e
        raise
