"""`import nt` has no side effects on the process's threading: it starts no thread pool and
loads no OpenMP runtime, so a library imported after nt (PyTorch) brings its own. The
kernels that read Numba's thread count still load from the cache in a fresh process.

Each check runs in a fresh interpreter: the test process has long since started Numba's pool.
"""
import json
import subprocess
import sys

import pytest

# prints what the process has loaded and started, as JSON
STATE = """
import json, numba.np.ufunc.parallel as parallel
maps = open("/proc/self/maps").read()
state = {"pool": parallel._is_initialized, "libgomp": "libgomp" in maps,
         "numba_omp": "omppool" in maps, "numba_tbb": "tbbpool" in maps}
"""

# a matmul kernel as the first kernel of the process, checked against NumPy
FIRST_KERNEL = """
import numpy as np
from nt.kernels.cpu.matmul import matmul_backward, matmul_forward
rng = np.random.default_rng(0)
x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((37, 24), (40, 24), (40,)))
out = np.empty((37, 40), np.float32)
matmul_forward(out, x, w, b)
dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros_like(b)
matmul_backward(dx, dw, db, out, x, w)
state["error"] = max(float(np.abs(out - (x @ w.T + b)).max()), float(np.abs(dx - out @ w).max()),
                     float(np.abs(dw - out.T @ x).max() / np.abs(dw).max()))
state["pool_after"] = parallel._is_initialized
state["cache_hits"] = sum(matmul_forward.stats.cache_hits.values()) + sum(matmul_backward.stats.cache_hits.values())
"""


def run(code: str) -> dict:
    """Run `code` in a fresh interpreter and return its `state` dict."""
    proc = subprocess.run([sys.executable, "-c", code + "\nprint(json.dumps(state))"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_starts_no_thread_pool():
    state = run("import nt\n" + STATE)
    assert state == {"pool": False, "libgomp": False, "numba_omp": False, "numba_tbb": False}


def test_thread_count_kernels_load_from_cache_as_first_kernel():
    """matmul_forward/backward read Numba's thread count through a symbol the threading layer
    registers when its pool starts. Called first thing in a fresh process, from the cache
    (the first run fills it if needed), they must link and compute right."""
    code = "import nt\n" + STATE + FIRST_KERNEL
    run(code)   # compiles into the cache if it is cold
    state = run(code)
    assert state["cache_hits"] == 2
    assert state["pool"] is False and state["pool_after"] is True
    assert state["error"] < 1e-4


def test_torch_imported_after_nt_brings_its_own_openmp():
    """Before this, `import nt` loaded the system libgomp (with nt's OMP_WAIT_POLICY), and
    PyTorch imported afterwards ran on it, 1.45x slower. PyTorch's wheel ships its own."""
    pytest.importorskip("torch")
    state = run("import nt\n" + STATE + "\nimport torch\nstate['torch_gomp'] = [l.split()[-1] for l in "
                "open('/proc/self/maps') if 'gomp' in l]\n")
    assert state["pool"] is False and state["libgomp"] is False
    # whatever OpenMP runtime torch has, it loaded it from its own package
    assert all("torch" in path for path in state["torch_gomp"])
