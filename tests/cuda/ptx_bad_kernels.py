"""Deliberately bad kernels for test_ptx.py: the ptxas resource check must reject each.

Run as a script (outside the simulator); prints one JSON object: kernel name -> the
problems ptx_check.problems() found for it on sm_80.
"""
import json
import os
import sys

import numpy as np

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
sys.path.insert(0, os.path.dirname(__file__))
import ptx_check  # noqa: E402  (sets up compilation without a GPU)
from numba import cuda, types  # noqa: E402


def local_array(out, n):
    """A 2 KB array indexed at run time cannot live in registers: a local-memory stack frame."""
    a = cuda.local.array(512, np.float32)
    for i in range(n):
        a[i % 512] += out[i]
    out[0] = a[n % 512]


def many_live(out):
    """48 values live at once; assembled with at most 16 registers, they spill."""
    i = cuda.grid(1)
    a = cuda.local.array(48, np.float32)
    for k in range(48):
        a[k] = out[i + k] * out[i + 2 * k]
    s = np.float32(0)
    for k in range(48):
        for j in range(48):
            s += a[k] * a[j]
    out[i] = s


def big_shared(out):
    """64 KB of static shared memory: over the 48 KB a block gets without an opt-in."""
    buf = cuda.shared.array(16384, np.float32)
    buf[cuda.threadIdx.x] = out[0]
    cuda.syncthreads()
    out[1] = buf[cuda.threadIdx.x + 1]


def main(cache_file):
    ptxas = ptx_check.Ptxas(ptx_check.find_ptxas(), cache_file)
    A = types.float32[::1]
    found = {}
    for kernel, sig, options in [(local_array, (A, types.int64), ()),
                                 (many_live, (A,), ("--maxrregcount=16",)),
                                 (big_shared, (A,), ())]:
        ptx, _ = cuda.compile_ptx(kernel, sig, cc=(8, 0))
        found[kernel.__name__] = ptx_check.problems(ptxas.resources(ptx, "sm_80", options))
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1])
