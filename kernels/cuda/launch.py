"""Launch configuration shared by the CUDA kernels, and block-wide reductions.

Every kernel walks its work with a grid-stride loop, so any grid size is correct and the
wrappers choose sizes for speed. Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) each
simulated thread is a Python thread, so grids there are kept tiny; the kernels are the
same code either way.
"""
import math

from numba import cuda
from numba.cuda.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)
THREADS = 8 if SIMULATOR else 256          # threads per 1-D block (a power of two)
MAX_BLOCKS = 4 if SIMULATOR else 8192       # grid-stride loops cover the rest
TILE = 4 if SIMULATOR else 16               # GEMM fallback: TILE x TILE threads per block
CHUNK_ROWS = 4 if SIMULATOR else 32         # column reductions: rows per stage-1 chunk (reduce.py)
MAX_CHUNKS = 1024                           # ... and at most this many chunks

# These sizes reach kernels only as launch dimensions or arguments, never as globals read
# inside a `cache=True` kernel: Numba's cache keys on the kernel's own file, so a kernel
# that baked in a constant from this file would keep its stale value after an edit.
# Block reductions size their shared buffers at launch (dynamic shared memory, shared_bytes).


def shared_bytes(dtype, n: int = THREADS) -> int:
    """Dynamic shared memory for a launch whose kernel keeps n values of dtype per block."""
    return n * dtype.itemsize


def blocks(n: int, per_block: int = THREADS) -> int:
    """Blocks for n work items at per_block items per block, capped at MAX_BLOCKS."""
    return max(1, min(MAX_BLOCKS, math.ceil(n / per_block)))


@cuda.jit(device=True, cache=True)
def block_sum(buf, value):
    """The sum of `value` over the block's threads, returned to every thread.

    buf is a shared array of at least blockDim.x elements (blockDim.x a power of two),
    of the accumulation type; a tree reduction with syncthreads, no warp shuffles, so it
    also simulates.
    Every thread of the block must call it.
    """
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            buf[t] += buf[t + step]
        cuda.syncthreads()
        step //= 2
    total = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before the caller reuses buf
    return total


@cuda.jit(device=True, cache=True)
def block_max(buf, value):
    """The maximum of `value` over the block's threads, like block_sum."""
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            buf[t] = max(buf[t], buf[t + step])
        cuda.syncthreads()
        step //= 2
    total = buf[0]
    cuda.syncthreads()
    return total
