"""Stage 3: registers, shared and local memory of every kernel as loaded on this GPU.

Each kernel is compiled for the device in hand (sm_90 on an H200) with the float32 argument
types of tests/cuda/ptx_check.py (the list CI keeps complete), then the driver's numbers for
the loaded module are read. Local memory above zero means a stack frame: spills or run-time
indexed per-thread arrays, the first thing to look at in a slow kernel.
"""
from __future__ import annotations

import os
import sys

from common import REPO, Report, parse

STATIC_SHARED_LIMIT = 48 * 1024   # bytes of static shared memory a block may declare


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    report = Report(args.out)
    from numba.cuda import dispatcher
    real_device = getattr(dispatcher, "get_current_device", None)
    sys.path.insert(0, os.path.join(REPO, "tests", "cuda"))
    import ptx_check  # replaces the device lookup with a stand-in for compiling without a GPU: undo that
    dispatcher.get_current_device = real_device
    from numba import types
    listed = ptx_check.signatures(types.float32)
    report.set("kernels_listed", len(listed))
    if args.simulate:   # the simulator compiles nothing: the list is all there is to check
        report.set("kernels", [f"{k.py_func.__module__}.{k.py_func.__name__}" for k, _ in listed])
        return
    rows, failures = [], []
    for kernel, sig in listed:
        name = f"{kernel.py_func.__module__.rsplit('.', 1)[-1]}.{kernel.py_func.__name__}"
        try:
            k = kernel.compile(tuple(sig))
            row = {"kernel": name, "signature": str(tuple(sig)),
                   "registers": k.regs_per_thread, "shared_bytes": k.shared_mem_per_block,
                   "local_bytes": k.local_mem_per_thread, "max_threads_per_block": k.max_threads_per_block}
            row["flags"] = [f for f, bad in (("local memory", row["local_bytes"] > 0),
                                             ("shared over 48 KB", row["shared_bytes"] > STATIC_SHARED_LIMIT),
                                             ("cannot launch 256 threads", row["max_threads_per_block"] < 256))
                            if bad]
            rows.append(row)
        except Exception as e:  # record and go on: one kernel must not hide the others
            failures.append({"kernel": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        report.set("kernels", rows)
        report.set("failures", failures)
    report.set("flagged", [r for r in rows if r["flags"]])
    print(f"{len(rows)} kernels loaded, {len(failures)} failed, {len(report.data['flagged'])} flagged")
    for r in sorted(rows, key=lambda r: -r["registers"])[:15]:
        print(f"{r['kernel']:45s} regs {r['registers']:4d} shared {r['shared_bytes']:6d} local {r['local_bytes']:6d}")


if __name__ == "__main__":
    main()
