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

Mixed-precision training (docs/cuda.md) uses two more things from here: `operand`, the bf16
copy of a float32 matmul operand (an activation or its gradient, possibly a column block)
in a reused buffer, and `Shadows`, the bf16 copies of the float32 master weights, each
written once per forward by the same rounding kernel.
"""
import numpy as np
from numba import cuda

from .dropout import _uniform
from .launch import THREADS, blocks


@cuda.jit(cache=True)
def _to_bf16(out, bits, stochastic, key):
    """out[r, c] <- bf16 bits of the float32 bits[r, c]; bits may be a column block (any row
    stride), out is contiguous. Flat arrays come as one row; the random bits' index is the
    element's row-major position in out."""
    cols = bits.shape[1]
    for i in range(cuda.grid(1), bits.shape[0] * cols, cuda.gridsize(1)):
        n = np.int64(bits[i // cols, i % cols])
        if (n & 0x7FFFFFFF) > 0x7F800000:          # NaN: keep the sign and top payload, set quiet bit
            out[i // cols, i % cols] = np.uint16((n >> 16) | 64)
        else:
            if stochastic:                          # 16 uniform random bits
                r = np.int64(_uniform(key, i) * 65536.0)
            else:                                   # half an ulp, minus one unless the kept lsb is odd
                r = 0x7FFF + ((n >> 16) & 1)
            out[i // cols, i % cols] = np.uint16((n + r) >> 16)   # a carry rounds the magnitude up (to inf at the top)


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
        _to_bf16[blocks(x.shape[0]), THREADS](out.reshape(1, -1), x.view(np.uint32).reshape(1, -1), False, np.uint64(0))


def to_bf16_stochastic(out, x, key: int) -> None:
    """out (n,) uint16 <- bf16 bits of x (n,) float32, rounded stochastically: up with
    probability (x - round_down(x)) / ulp, so E[out] = x. The same key and index give the
    same bits; pass a new key (e.g. mixing a seed with the step) for fresh randomness."""
    _check(out, x, np.uint16, np.float32, "to_bf16_stochastic")
    if x.shape[0]:
        _to_bf16[blocks(x.shape[0]), THREADS](out.reshape(1, -1), x.view(np.uint32).reshape(1, -1), True,
                                              np.uint64(key % 2 ** 64))


def from_bf16(out, b) -> None:
    """out (n,) float32 <- the values of bf16 bits b (n,) uint16 (exact)."""
    _check(out, b, np.float32, np.uint16, "from_bf16")
    if b.shape[0]:
        _from_bf16[blocks(b.shape[0]), THREADS](out.view(np.uint32), b)


def to_bf16_2d(out, x) -> None:
    """out (R, C) contiguous uint16 <- bf16 bits of x (R, C) float32, rounded to nearest even;
    x needs unit column stride (a column block of a wider matrix is fine)."""
    if (out.dtype != np.uint16 or x.dtype != np.float32 or out.shape != x.shape or x.ndim != 2
            or x.strides[1] != 4 or not out.is_c_contiguous()):
        raise ValueError(f"to_bf16_2d: need out (R, C) contiguous uint16 and x (R, C) float32 with unit column "
                         f"stride, got out {out.dtype} {out.shape}, x {x.dtype} {x.shape} strides {x.strides}")
    if x.size:
        _to_bf16[blocks(x.size), THREADS](out, x.view(np.uint32), False, np.uint64(0))


_OPERANDS: dict = {}   # slot -> the reused uint16 buffer behind operand()


def operand(x, slot: int):
    """The bf16 (RNE) copy of a float32 matmul operand x (R, C) in buffer `slot` (0 or 1: a
    GEMM reads two at once), valid until the next call with that slot. The buffer grows to
    the largest operand seen, so steady steps allocate nothing."""
    buf = _OPERANDS.get(slot)
    if buf is None or buf.shape[0] < x.size:
        buf = _OPERANDS[slot] = cuda.device_array(max(x.size, 1), dtype=np.uint16)
    out = buf[:x.size].reshape(x.shape)
    to_bf16_2d(out, x)
    return out


def address(a) -> int:
    """The device address of a's first element (under the simulator, of the NumPy array
    underneath: its arrays have no CUDA interface)."""
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return iface["data"][0]


class Shadows:
    """bf16 copies of float32 master weights, for a mixed-precision tape's matmuls.

    `of(w)` returns w's copy, rounding w (RNE) the first time it is asked for after
    `stale()`; the tape calls stale() whenever it rewinds for a forward, so each weight is
    rounded once per forward, after whatever changed it (the optimizer's step, a load, an
    init), and the backward reuses the forward's copy. Copies are keyed by w's address,
    shape and strides (a parameter view is the same memory every step) and made once.
    """

    def __init__(self):
        self.copies: dict = {}
        self.fresh: set = set()

    def stale(self) -> None:
        """The masters may have changed: round each again at its next use."""
        self.fresh.clear()

    def of(self, w):
        """The bf16 copy (uint16 bits, contiguous) of the float32 2-D weight w."""
        key = (address(w), w.shape, w.strides)
        copy = self.copies.get(key)
        if copy is None:
            copy = self.copies[key] = cuda.device_array(w.shape, dtype=np.uint16)
        if key not in self.fresh:
            to_bf16_2d(copy, w)
            self.fresh.add(key)
        return copy

    @property
    def nbytes(self) -> int:
        """Device bytes held by the copies."""
        return sum(c.size * 2 for c in self.copies.values())


_WIDE: dict = {}   # slot -> float32 buffer for widen() (simulator only)


def widen(b, slot: int):
    """The float32 values of bf16 bits b (R, C), contiguous, in buffer `slot` (exact). The
    simulator's GEMM multiplies these: no cuBLAS there, and the simulator cannot bit-cast
    inside a kernel, so bf16 operands become exact float32 copies first."""
    buf = _WIDE.get(slot)
    if buf is None or buf.shape[0] < b.size:
        buf = _WIDE[slot] = cuda.device_array(max(b.size, 1), dtype=np.float32)
    out = buf[:b.size]
    if b.size:
        _from_bf16[blocks(b.size), THREADS](out.view(np.uint32), b.reshape(-1))
    return out.reshape(b.shape)
