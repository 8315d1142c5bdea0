"""float32 <-> bfloat16 on the GPU, on bit patterns: the foundation of bf16 mixed precision.

A bf16 value is the top 16 bits of a float32, so nt keeps bf16 tensors as uint16 device
arrays, on hardware as under the simulator: the conversions below are integer operations
on a float32 array viewed as uint32 (exact, and identical on every backend; the simulator
has no bf16 type and no float<->int bit casts), and cuBLAS reads and writes the same uint16
buffers as CUDA_R_16BF in its mixed-precision GEMMs.

- to_bf16: round to nearest, ties to even, as IEEE and every framework do; NaNs stay NaN
  (quiet, sign kept; a payload only in the dropped bits would otherwise round to inf).
  Bit-identical to the CPU's nt.kernels.cpu.quant.quantize_bf16.
- to_bf16_stochastic: round up with probability (dropped bits) / 2^16, so the expected
  value of the result is the input: the rounding llm.c uses when AdamW writes bf16 weights,
  where round-to-nearest would drop every update smaller than half a bf16 ulp. The random
  bits come from dropout's counter-based generator (a key and the element's index).
- from_bf16: exact (bits << 16).
"""
import numpy as np
from numba import cuda

from .dropout import _uniform
from .launch import THREADS, blocks


@cuda.jit(cache=True)
def _to_bf16(out, bits, stochastic, key):
    for i in range(cuda.grid(1), bits.shape[0], cuda.gridsize(1)):
        n = np.int64(bits[i])
        if (n & 0x7FFFFFFF) > 0x7F800000:          # NaN: keep the sign and top payload, set quiet bit
            out[i] = np.uint16((n >> 16) | 64)
        else:
            if stochastic:                          # 16 uniform random bits
                r = np.int64(_uniform(key, i) * 65536.0)
            else:                                   # half an ulp, minus one unless the kept lsb is odd
                r = 0x7FFF + ((n >> 16) & 1)
            out[i] = np.uint16((n + r) >> 16)        # a carry rounds the magnitude up (to inf at the top)


@cuda.jit(cache=True)
def _from_bf16(out_bits, b):
    for i in range(cuda.grid(1), b.shape[0], cuda.gridsize(1)):
        out_bits[i] = np.uint32(np.int64(b[i]) << 16)


def _check(out, x, out_dtype, x_dtype, name: str) -> None:
    if out.dtype != out_dtype or x.dtype != x_dtype or out.shape != x.shape or x.ndim != 1:
        raise ValueError(f"{name}: need out ({out_dtype.__name__}) and x ({x_dtype.__name__}) flat device arrays "
                         f"of one shape, got out {out.dtype} {out.shape}, x {x.dtype} {x.shape}")


def to_bf16(out, x) -> None:
    """out (n,) uint16 <- bf16 bits of x (n,) float32, rounded to nearest even."""
    _check(out, x, np.uint16, np.float32, "to_bf16")
    if x.shape[0]:
        _to_bf16[blocks(x.shape[0]), THREADS](out, x.view(np.uint32), False, np.uint64(0))


def to_bf16_stochastic(out, x, key: int) -> None:
    """out (n,) uint16 <- bf16 bits of x (n,) float32, rounded stochastically: up with
    probability (x - round_down(x)) / ulp, so E[out] = x. The same key and index give the
    same bits; pass a new key (e.g. mixing a seed with the step) for fresh randomness."""
    _check(out, x, np.uint16, np.float32, "to_bf16_stochastic")
    if x.shape[0]:
        _to_bf16[blocks(x.shape[0]), THREADS](out, x.view(np.uint32), True, np.uint64(key % 2 ** 64))


def from_bf16(out, b) -> None:
    """out (n,) float32 <- the values of bf16 bits b (n,) uint16 (exact)."""
    _check(out, b, np.float32, np.uint16, "from_bf16")
    if b.shape[0]:
        _from_bf16[blocks(b.shape[0]), THREADS](out.view(np.uint32), b)
