"""ggml's Q8_0 and Q4_0 blocks on the GPU: dequantisers and matmul straight on the blocks.

Same names and signatures as nt.kernels.cpu.quant (see its docstring for the block layouts).
A block holds 32 elements, so one warp covers one block with one element per lane: lane j
reads quant byte j of the block (Q4_0: byte j % 16, nibble j // 16) and x[.., b*32 + j],
both as consecutive addresses across the warp (coalesced), and every lane reads the same
two scale bytes (one broadcast). All math is float32.

- Decoding (few rows): `matmul_q8_0` / `matmul_q4_0` give each output row of W one warp,
  which walks that row's blocks, keeps one float32 partial sum per lane and reduces the 32
  lanes once at the end. The weight is never expanded.
- Prefill (many rows): nt.ops.linear_q dequantises W into a float32 scratch with
  `dequantize_q8_0` / `dequantize_q4_0` (one thread per element, coalesced writes) and calls
  the ordinary matmul (cuBLAS on hardware), which reuses every weight element N times.

Halves are decoded arithmetically in registers (exact for every bit pattern), so the `f16`
table argument of the CPU signature is accepted and not used. The warp's final reduction
is a butterfly of shuffles on hardware; the simulator has no shuffles, so there (only) it
goes through shared memory.
"""
import math

import numpy as np
from numba import cuda

from .launch import SIMULATOR, THREADS, blocks

QK = 32                       # elements per block = lanes per warp
WARPS = 4 # warps (output rows in flight) per block of the block matmuls
SLOTS = 8 * 32                # the simulator's reduction scratch: up to 8 warps of 32 lanes
MAX_BLOCKS = 2 if SIMULATOR else 65535
F16_TABLE = None              # the CPU kernels' half -> float table; the GPU decodes in registers


@cuda.jit(device=True, cache=True)
def _half(lo, hi):
    """The float32 value of the IEEE half whose little-endian bytes are lo, hi (exact:
    every half is a float32, and each product below is of powers of two or integers < 2^11)."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(m) * np.float32(2.0 ** -24)               # zero and subnormals
    elif e == 31:
        v = np.float32(math.inf) if m == 0 else np.float32(math.nan)
    else:
        v = np.float32(1024 + m) * np.float32(1 << e) * np.float32(2.0 ** -25)
    return -v if h & 0x8000 else v


@cuda.jit(device=True, cache=True)
def _element(raw, p, lane, q4):
    """Element `lane` of the block at byte p of raw: Q8_0 d * q, or (q4) Q4_0 d * (q - 8)
    with q nibble lane // 16 of byte lane % 16."""
    d = _half(raw[p], raw[p + 1])
    if q4:
        return d * np.float32(((np.int32(raw[p + 2 + (lane & 15)]) >> (4 * (lane >> 4))) & 15) - 8)
    return d * np.float32(np.int8(raw[p + 2 + lane]))


if SIMULATOR:
    @cuda.jit(device=True, cache=True)
    def _warp_sum(buf, value):
        """The sum of `value` over the caller's warp (32 consecutive threads), returned to
        every lane. The simulator has no shuffles: lanes meet in shared memory, and every
        thread of the block must call this (it holds block barriers; two, as each barrier
        costs the simulator milliseconds)."""
        t = cuda.threadIdx.x
        base = t - t % QK
        buf[t] = value
        cuda.syncthreads()
        total = np.float32(0.0)
        for j in range(QK):
            total += buf[base + j]
        cuda.syncthreads()  # all lanes have read buf before the caller's next write to it
        return total
else:
    @cuda.jit(device=True, cache=True)
    def _warp_sum(buf, value):
        """The sum of `value` over the caller's warp, returned to every lane: a butterfly of
        register shuffles (buf, the simulator's shared scratch, is not used)."""
        step = QK // 2
        while step > 0:
            value += cuda.shfl_xor_sync(0xFFFFFFFF, value, step)
            step //= 2
        return value


@cuda.jit(cache=True)
def _block_matmul(out, x, w, q4):
    """out[n, oc] = sum_c x[n, c] * W[oc, c], one warp per output row oc (grid-stride)."""
    N, C = x.shape
    OC = w.shape[0]
    size = 18 if q4 else 34
    lane = cuda.threadIdx.x % QK
    warps = cuda.blockDim.x // QK
    buf = cuda.shared.array(SLOTS, np.float32)
    # the loop bounds are the same for every thread of a block, so all reach the barriers
    for first in range(cuda.blockIdx.x * warps, OC, cuda.gridDim.x * warps):
        oc = first + cuda.threadIdx.x // QK
        for n in range(N):
            acc = np.float32(0.0)
            if oc < OC:
                row = w[oc]
                for b in range(C // QK):
                    acc += _element(row, b * size, lane, q4) * x[n, b * QK + lane]
            total = _warp_sum(buf, acc)
            if lane == 0 and oc < OC:
                out[n, oc] = total


@cuda.jit(cache=True)
def _dequantize(out, raw, q4):
    """out[i] = element i of the blocks raw: one thread per element, so writes coalesce."""
    size = 18 if q4 else 34
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = _element(raw, i // QK * size, i % QK, q4)


def _check(out, x, w, bytes_per_block: int, name: str) -> None:
    """Shapes the kernels rely on (they index without bounds checks)."""
    N, C = x.shape
    if C % QK or w.ndim != 2 or w.shape[1] != C // QK * bytes_per_block or out.shape != (N, w.shape[0]):
        raise ValueError(f"{name}: need x (N, C) with C a multiple of {QK}, w (OC, C/{QK}*{bytes_per_block}) "
                         f"bytes and out (N, OC); got x {x.shape}, w {w.shape}, out {out.shape}")


def _launch_block_matmul(out, x, w, q4: bool) -> None:
    grid = max(1, min(MAX_BLOCKS, math.ceil(w.shape[0] / WARPS)))
    _block_matmul[grid, WARPS * QK](out, x, w, q4)


def matmul_q8_0(out, x, w, f16=None, scratch=None):
    """out (N, OC) = x (N, C) @ W^T with W stored as Q8_0 rows w (OC, C/32*34) uint8, all on
    the device. One warp per output row; f16 and scratch (the CPU's half table and per-thread
    lanes) are accepted for the CPU signature and not needed here."""
    _check(out, x, w, 34, "matmul_q8_0")
    _launch_block_matmul(out, x, w, False)


def matmul_q4_0(out, x, w, f16=None, scratch=None):
    """As matmul_q8_0 for Q4_0 rows w (OC, C/32*18)."""
    _check(out, x, w, 18, "matmul_q4_0")
    _launch_block_matmul(out, x, w, True)


def _launch_dequantize(out, raw, q4: bool, name: str) -> None:
    size = 18 if q4 else 34
    if out.shape[0] % QK or raw.shape[0] != out.shape[0] // QK * size:
        raise ValueError(f"{name}: out ({out.shape[0]},) must be whole blocks of {QK} and raw exactly "
                         f"their {size}-byte blocks, got raw ({raw.shape[0]},)")
    if out.shape[0]:
        _dequantize[blocks(out.shape[0]), THREADS](out, raw, q4)


def dequantize_q8_0(out, raw, f16=None):
    """out (n,) float32 <- Q8_0 blocks raw (n/32*34,) uint8, on the device (bit-identical to the CPU's)."""
    _launch_dequantize(out, raw, False, "dequantize_q8_0")


def dequantize_q4_0(out, raw, f16=None):
    """out (n,) float32 <- Q4_0 blocks raw (n/32*18,) uint8, on the device (bit-identical to the CPU's)."""
    _launch_dequantize(out, raw, True, "dequantize_q4_0")
