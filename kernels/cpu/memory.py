"""Buffers on the CPU: plain NumPy arrays. The CUDA backend has the same functions."""
import numpy as np
from numba import njit, prange

DEVICE = "cpu"


def empty(n, dtype):
    """A new uninitialised flat buffer of n elements."""
    return np.empty(n, dtype=dtype)


@njit(parallel=True, cache=True)
def fill_(x, value):
    """x[:] = value, in place, in parallel (zeroing large grad buffers)."""
    for i in prange(x.shape[0]):
        x[i] = value


def copy_(dst, src):
    """dst[:] = src, where src is a host (NumPy) or same-device array."""
    np.copyto(dst, src)


def to_host(x):
    """The array as NumPy. On the CPU this is the array itself: no copy."""
    return x


def to_device(x):
    """A host array as this device's array (on the CPU, the array itself)."""
    return x


def synchronize():
    """Wait for queued kernels to finish. CPU kernels run synchronously: nothing to wait for."""
