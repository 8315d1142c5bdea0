"""GGUF kernels: dequantisation throughput per type, and matmul straight on Q8_0/Q4_0 blocks
against a float32 BLAS matvec, on LLaMA-sized matrices.

    python benchmarks/bench_gguf.py                  # 2048x8192 dequant, N=1 matvecs
    python benchmarks/bench_gguf.py --reps 20 --n 1 4

Dequantisation: GB/s of float32 written (and of quantised bytes read). Matvec: out (N, OC) =
x (N, C) @ W^T for W (OC, C) as float32 (NumPy/OpenBLAS sgemm) or as blocks (nt's kernel,
decoding one block at a time); "weight GB/s" is the bytes of W read per second. Timings
are the median of --reps runs after a warm-up (which also loads Numba's cache); the
dequantisers write into a preallocated array (page faults of a fresh one are not counted).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from nt.io import gguf as G
from nt.kernels.cpu import quant

# byte offsets of the f16 fields (scales, mins) in each block type: random bytes elsewhere are valid
HALVES = {"F16": None, "BF16": None, "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
          "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, n: int, rng) -> np.ndarray:
    """Valid raw bytes of `n` elements of qtype (finite scales; F16/BF16 from real values)."""
    if qtype in ("F16", "BF16"):
        return G.quantize(rng.standard_normal(n).astype(np.float32), qtype).reshape(-1)
    _, bs, ts = G.GGML_TYPES[G.GGML_TYPE_IDS[qtype]]
    raw = rng.integers(0, 256, (n // bs, ts), dtype=np.uint8)
    for off in HALVES[qtype]:
        raw[:, off:off + 2] = rng.uniform(-1, 1, (n // bs, 1)).astype("<f2").view(np.uint8)
    return raw.reshape(-1)


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--n", type=int, nargs="+", default=[1], help="rows of x (1 = decoding one token)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    rows, cols = 8192, 2048
    n = rows * cols
    print(f"dequantise {rows}x{cols} ({n / 1e6:.1f}M elements)")
    print(f"{'type':6} {'ms':>8} {'out GB/s':>9} {'in GB/s':>8}")
    src = np.random.default_rng(1).standard_normal(n).astype(np.float16)
    dst = np.empty(n, dtype=np.float32)
    t = timed(lambda: np.copyto(dst, src), args.reps)
    print(f"{'(numpy f16->f32 copyto, for scale)':34} {t * 1e3:8.2f} ms {4 * n / t / 1e9:6.2f} GB/s")
    for qtype in HALVES:
        raw = random_blocks(qtype, n, rng)
        out = np.empty(n, dtype=np.float32)   # preallocated: time the kernel, not page faults
        target = out.view(np.uint32) if qtype == "BF16" else out
        kernel = G._DEQUANTIZE[qtype]
        t = timed(lambda: kernel(target, raw, quant.F16_TABLE), args.reps)
        print(f"{qtype:6} {t * 1e3:8.2f} {4 * n / t / 1e9:9.2f} {raw.size / t / 1e9:8.2f}")

    print("\nmatvec out (N, OC) = x (N, C) @ W^T")
    print(f"{'W (OC x C)':12} {'N':>3} {'type':5} {'ms':>8} {'weight GB/s':>11} {'vs f32':>7} {'max rel err':>11}")
    for OC, C in ((2048, 2048), (8192, 2048), (2048, 8192)):
        W = (rng.standard_normal((OC, C)) * 0.02).astype(np.float32)
        for N in args.n:
            x = rng.standard_normal((N, C)).astype(np.float32)
            t32 = timed(lambda: x @ W.T, args.reps)
            print(f"{OC}x{C:<7} {N:3} {'F32':5} {t32 * 1e3:8.3f} {W.nbytes / t32 / 1e9:11.2f} {1.0:7.2f}")
            for qtype in ("Q8_0", "Q4_0"):
                w = G.quantize(W, qtype)
                ref = x @ G.dequantize(w, qtype, W.shape).T
                out = G.quantized_matmul(x, w, qtype)
                err = np.abs(out - ref).max() / np.abs(ref).max()
                t = timed(lambda: G.quantized_matmul(x, w, qtype), args.reps)
                print(f"{OC}x{C:<7} {N:3} {qtype:5} {t * 1e3:8.3f} {w.nbytes / t / 1e9:11.2f} "
                      f"{t32 / t:7.2f} {err:11.1e}")


if __name__ == "__main__":
    main()
