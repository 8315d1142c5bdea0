"""Buffers on the GPU: Numba device arrays. Same functions as nt.kernels.cpu.memory."""
import numpy as np
from numba import cuda

from .launch import THREADS, blocks

DEVICE = "cuda"


def empty(n, dtype):
    """A new uninitialised flat device buffer of n elements."""
    return cuda.device_array(n, dtype=dtype)


@cuda.jit(cache=True)
def _fill(x, value):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] = value


def fill_(x, value):
    """x[:] = value, in place (x flat)."""
    if x.shape[0]:
        _fill[blocks(x.shape[0]), THREADS](x, value)


def copy_(dst, src):
    """dst[:] = src, where src is a host (NumPy) or device array of the same shape."""
    dst.copy_to_device(src)


def to_host(x):
    """A NumPy copy of a device array."""
    return x.copy_to_host()


def to_device(x):
    """A new device array holding a copy of the host array x."""
    return cuda.to_device(np.ascontiguousarray(x))


_IDS: dict = {}


def ids_to_device(ids):
    """Integer inputs (token ids, targets) arrive from nt.ops as NumPy int32 arrays.

    They are copied into a device buffer kept per shape, so a training step allocates
    nothing. Each kernel call copies its own ids right before its launch: the copy is
    ordered after earlier launches on the default stream, so reusing the buffer for
    another op's ids (of the same shape) cannot race. Device arrays pass through.
    """
    if not isinstance(ids, np.ndarray):
        return ids
    buf = _IDS.get(ids.shape)
    if buf is None:
        buf = _IDS[ids.shape] = cuda.device_array(ids.shape, dtype=np.int32)
    buf.copy_to_device(ids)
    return buf


def synchronize():
    """Wait for every kernel queued on the GPU to finish (timings measure the work, not the launch)."""
    cuda.synchronize()
