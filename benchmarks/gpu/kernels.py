"""Stage 4: bench_kernels.py's CUDA column (GPT-2 124M layer shapes), as JSON.

The cases and the timer are bench_kernels.py's; this stage skips its CPU column (minutes at
B=8, T=1024, and not what the GPU run is for). Each kernel: one warm-up call (compilation),
then `reps` calls between two synchronisations.
"""
from __future__ import annotations

import numpy as np

from common import Report, parse


def main() -> None:
    args = parse(__doc__.splitlines()[0], B=8, T=1024, C=768, NH=12, V=50257, reps=20, limit=0)
    report = Report(args.out)
    import bench_kernels
    from numba import cuda

    import nt
    gpu = nt.backend("cuda")
    report.set("config", {k: getattr(args, k) for k in ("B", "T", "C", "NH", "V", "reps")})
    rows = []
    cases = bench_kernels.cases(args.B, args.T, args.C, args.NH, args.V, np.random.default_rng(0))
    for name, host in cases[:args.limit or None]:
        dev = [gpu.to_device(x) if isinstance(x, np.ndarray) and x.dtype != np.int32 else x for x in host]
        try:
            ms = 1e3 * bench_kernels.time_kernel(gpu, name, dev, args.reps, cuda.synchronize)
            rows.append({"kernel": name, "cuda_ms": round(ms, 4)})
        except Exception as e:  # one failing kernel must not hide the others
            rows.append({"kernel": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        report.set("kernels", rows)
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
