"""Per-kernel timings, CPU vs CUDA, on GPT-2-layer shapes.

    python benchmarks/bench_kernels.py                  # GPT-2 124M layer, B=4 T=256
    python benchmarks/bench_kernels.py --B 8 --T 1024 --reps 20

CUDA columns need a real GPU (pip install 'nt[cuda]'). Under the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1) or without a GPU they are skipped with a message: simulated
kernels say nothing about GPU speed. Token ids stay NumPy arrays, as nt.ops passes
them, so CUDA times for embedding and cross-entropy include their host-to-device copy.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import nt
from nt.optim import block_table


def cases(B: int, T: int, C: int, NH: int, V: int, rng: np.random.Generator, NKV: int = 0):
    """(name, kernel, args) for one transformer layer's kernels, float32; NKV key/value heads
    (grouped-query attention), 0 for NH."""
    N, Vp, f = B * T, (V + 127) // 128 * 128, np.float32
    NKV = NKV or NH
    W = C + 2 * NKV * (C // NH)  # fused qkv width: NH query heads, NKV key and NKV value heads

    def r(*shape):
        return rng.standard_normal(shape).astype(f)

    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = ids.reshape(N)
    qkv, att, lse = r(B, T, W), r(B, T, C), r(B, NH, T)
    work = r(*nt.backend("cpu").attention_work_shape(T))
    nt.backend("cpu").attention_forward(att, lse, qkv, work, NH, NKV, 0, 0)  # valid lse for the backward
    logits, xlse = r(N, Vp), r(N)
    nt.backend("cpu").softmax_xent_forward(r(1), r(N), xlse, logits, targets, V)
    P = 12 * C * C  # one layer's parameters, roughly
    angles = np.outer(np.arange(T), 10000.0 ** -(np.arange(0, C // NH, 2) / (C // NH)))
    rope_table = np.concatenate([np.cos(angles), np.sin(angles)], 1)  # float64 (T, hs), as ops.rope passes it
    return [
        ("embedding_forward", [r(B, T, C), ids, r(V, C), r(T, C), 0]),
        ("embedding_backward", [r(V, C), r(T, C), r(B, T, C), ids, 0]),
        ("layernorm_forward", [r(N, C), r(N), r(N), r(N, C), r(C), r(C), 1e-5]),
        ("layernorm_backward", [r(N, C), r(C), r(C), r(N, C), r(N, C), r(C), r(N), np.ones(N, f)]),
        ("matmul_forward (qkv)", [r(N, 3 * C), r(N, C), r(3 * C, C), r(3 * C)]),
        ("matmul_backward (qkv)", [r(N, C), r(3 * C, C), r(3 * C), r(N, 3 * C), r(N, C), r(3 * C, C)]),
        ("attention_forward", [r(B, T, C), r(B, NH, T), qkv, work, NH, NKV, 0, 0]),
        ("attention_backward", [r(B, T, W), r(B, T, C), qkv, att, lse, work, NH, NKV, 0, 0]),
        ("gelu_forward", [r(N * 4 * C), r(N * 4 * C)]),
        ("gelu_backward", [r(N * 4 * C), r(N * 4 * C), r(N * 4 * C)]),
        ("add_forward", [r(N * C), r(N * C), r(N * C)]),
        ("matmul_forward (logits)", [r(N, Vp), r(N, C), r(Vp, C), np.empty(0, f)]),
        ("softmax_xent_forward", [r(1), r(N), r(N), logits, targets, V]),
        ("softmax_xent_backward", [r(N, Vp), np.ones(1, f), logits, xlse, targets, V]),
        ("adam_update (1 layer)", [r(P), r(P), r(P), np.abs(r(P)),
                                   *block_table(np.array([0, P]), np.ones(P, np.uint8)), np.ones(1), np.ones(1, np.int64),
                                   1e-4, 0.9, 0.95, 1e-8, 0.0, 0.1, np.ones(1), False]),
        # partials: long enough for either backend's block count (each uses its prefix)
        ("sum_squares (1 layer)", [r(P), np.zeros(max(nt.backend("cpu").sum_squares_blocks(P), 8192))]),
        ("rmsnorm_forward", [r(N, C), r(N), r(N, C), r(C), 1e-5]),
        ("rope_forward", [r(B, T, 3 * C), NH, NH, rope_table, True]),
        ("glu_forward (swiglu)", [r(N, 4 * C), r(N, 8 * C), 2]),
    ]


def time_kernel(k, name: str, args: list, reps: int, sync) -> float:
    """Seconds per call, after one warm-up call (compilation)."""
    fn = getattr(k, name.split(" ")[0])
    fn(*args)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    sync()
    return (time.perf_counter() - t0) / reps


def cuda_backend():
    """(kernels, synchronize) for a real GPU, or (None, reason)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        return None, "NUMBA_ENABLE_CUDASIM is set: the simulator's timings mean nothing"
    try:
        from numba import cuda
        if not cuda.is_available():
            return None, "no CUDA GPU found"
        return nt.backend("cuda"), cuda.synchronize
    except Exception as e:  # numba-cuda missing or no driver
        return None, f"CUDA unavailable ({type(e).__name__}: {e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--C", type=int, default=768)
    ap.add_argument("--NH", type=int, default=12)
    ap.add_argument("--NKV", type=int, default=0, help="key/value heads (grouped-query attention); 0 = NH")
    ap.add_argument("--V", type=int, default=50257)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    cpu = nt.backend("cpu")
    gpu, sync = cuda_backend()
    print(f"B={a.B} T={a.T} C={a.C} NH={a.NH} NKV={a.NKV or a.NH} V={a.V} float32, {a.reps} reps")
    if gpu is None:
        print(f"CUDA: skipped ({sync})")
    print(f"{'kernel':26s} {'cpu ms':>10s} {'cuda ms':>10s} {'speedup':>8s}")
    for name, args in cases(a.B, a.T, a.C, a.NH, a.V, rng, a.NKV):
        t_cpu = time_kernel(cpu, name, [x.copy() if isinstance(x, np.ndarray) else x for x in args],
                            a.reps, lambda: None)
        line = f"{name:26s} {1e3 * t_cpu:10.3f}"
        if gpu is not None:
            dev = [gpu.to_device(x) if isinstance(x, np.ndarray) and x.dtype != np.int32 else x for x in args]
            t_gpu = time_kernel(gpu, name, dev, a.reps, sync)
            line += f" {1e3 * t_gpu:10.3f} {t_cpu / t_gpu:7.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
