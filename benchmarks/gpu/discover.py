"""Stage 1: what the machine has. Driver, runtime, device, libNVVM/libdevice, cuBLAS, versions."""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import platform

from common import Report, parse


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "numba", "numba-cuda", "llvmlite", "cuda-bindings", "cuda-pathfinder", "nvidia-cublas",
                 "nvidia-nvvm", "torch", "cupy-cuda13x", "pytest"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device() -> dict:
    from numba import cuda
    dev = cuda.get_current_device()
    free, total = cuda.current_context().get_memory_info()
    return {"name": dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
            "compute_capability": list(dev.compute_capability), "multiprocessors": dev.MULTIPROCESSOR_COUNT,
            "memory_total_gib": round(total / 2 ** 30, 2), "memory_free_gib": round(free / 2 ** 30, 2),
            "driver_version": list(cuda.cudadrv.driver.driver.get_version()),
            "runtime_version": list(cuda.runtime.get_version())}


def detect() -> dict:
    from numba import cuda
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ok = cuda.detect()
    return {"available": bool(cuda.is_available()), "detect_ok": bool(ok), "detect": text.getvalue()[-2000:]}


def compilers() -> dict:
    """libNVVM (numba-cuda's compiler) and libdevice (its math library) found and loaded."""
    from numba.cuda.cudadrv import libs, nvvm
    return {"nvvm_version": list(nvvm.NVVM().get_version()), "libdevice": str(libs.get_libdevice())}


def cublas(M: int, N: int, K: int) -> dict:
    """cuBLAS loads, and nt's matmul (which must go through it on hardware) is right."""
    import numpy as np

    import nt
    from nt.kernels.cuda import cublas as blas
    k = nt.backend("cuda")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
    out = k.empty(M * N, np.float32).reshape(M, N)
    k.matmul_forward(out, k.to_device(x), k.to_device(w), k.empty(0, np.float32))  # no bias
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    err = float(np.abs(k.to_host(out) - want).max() / np.abs(want).max())
    path = None
    with contextlib.suppress(Exception):
        from cuda.pathfinder import load_nvidia_dynamic_lib
        path = load_nvidia_dynamic_lib("cublas").abs_path
    return {"available": bool(blas.available()), "library": path, "matmul_rel_error": err, "ok": err < 1e-4}


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    report = Report(args.out)
    report.set("simulated", args.simulate)
    report.set("numba_cache_dir", os.environ.get("NUMBA_CACHE_DIR"))
    report.set("versions", versions())
    for key, fn in (("detect", detect), ("device", device), ("compilers", compilers)):
        report.attempt(key, fn)
    report.attempt("cublas", cublas, *((4, 4, 8) if args.simulate else (640, 800, 960)))


if __name__ == "__main__":
    main()
