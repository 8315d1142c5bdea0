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
    """dst[:] = src, where src is a host (NumPy) or device array of the same shape.

    A small host array (a step's ids, targets, step counts) goes through a pinned staging
    buffer and an asynchronous copy on the default stream (_upload): ordered with the
    kernels, no wait for the GPU. A large one (loading weights, once) is copied directly,
    so the staging buffers stay small."""
    if isinstance(src, np.ndarray) and src.nbytes <= _STAGE_BYTES:
        _upload(dst, src)
    else:
        dst.copy_to_device(src)


class _Staging:
    """A pinned host buffer for uploads and an event recorded after the last copy out of
    it: it must not be rewritten before that copy ran."""

    def __init__(self):
        self.buf = np.empty(0, np.uint8)
        self.copied = None


_STAGING = [_Staging() for _ in range(4)]  # used in turn: a buffer is reused 4 uploads later
_STAGE_BYTES = 1 << 22  # 4 MB: ids and targets of B*T up to 10^6 tokens
_turn = [0]


def _upload(dst, src: np.ndarray) -> None:
    """dst[:] = src (host): src into the next pinned staging buffer, then an asynchronous
    host-to-device copy on the default stream. A pageable copy would block the host until
    the GPU has run everything queued before it; this waits only for the copy made from
    the same staging buffer four uploads ago (long done in a training loop). The buffers
    grow to the largest upload (in the first step), then nothing is allocated."""
    stage = _STAGING[_turn[0]]
    _turn[0] = (_turn[0] + 1) % len(_STAGING)
    if stage.copied is not None:
        stage.copied.synchronize()
    if stage.buf.nbytes < src.nbytes:  # all grow together: uploads rotate over them
        for other in _STAGING:
            if other.copied is not None:
                other.copied.synchronize()
            other.buf = cuda.pinned_array(src.nbytes, np.uint8)
            other.copied = cuda.event()
    host = stage.buf[:src.nbytes].view(src.dtype).reshape(src.shape)
    host[...] = src
    stream = cuda.default_stream()
    dst.copy_to_device(host, stream=stream)
    stage.copied.record(stream)


def to_host(x):
    """A NumPy copy of a device array."""
    return x.copy_to_host()


def to_device(x):
    """A new device array holding a copy of the host array x."""
    return cuda.to_device(np.ascontiguousarray(x))


_IDS: dict = {}


def ids_to_device(ids):
    """Integer inputs (token ids, targets, crop boxes) as device arrays: device arrays pass
    through (the tape keeps its ids on the device); a NumPy array is uploaded (copy_) into
    a device buffer kept per shape, so nothing is allocated per call. Each kernel call
    uploads right before its launch, ordered after earlier launches on the default
    stream, so reusing the buffer for another op's ids of the same shape cannot race."""
    if not isinstance(ids, np.ndarray):
        return ids
    buf = _IDS.get(ids.shape)
    if buf is None:
        buf = _IDS[ids.shape] = cuda.device_array(ids.shape, dtype=np.int32)
    copy_(buf, ids.astype(np.int32, copy=False))
    return buf


_SCRATCH: dict = {}


def scratch(n: int, dtype):
    """A flat device buffer of n elements of dtype, reused by every caller (it grows to the
    largest n asked for): kernel scratch that outlives one launch sequence on the default
    stream only, so a steady training step allocates nothing."""
    dtype = np.dtype(dtype)
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.shape[0] < n:
        buf = _SCRATCH[dtype] = cuda.device_array(max(n, 1), dtype=dtype)
    return buf[:n]


def synchronize():
    """Wait for every kernel queued on the GPU to finish (timings measure the work, not the launch)."""
    cuda.synchronize()
