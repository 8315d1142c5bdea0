"""CUDA tests run in Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is set.

numba-cuda reads NUMBA_ENABLE_CUDASIM once, when `numba.cuda` is first imported. Nothing
outside the CUDA backend imports it (nt.backend loads nt.kernels.cuda lazily, and plain
`import numba` does not import numba.cuda), so setting the default here, when pytest
collects this folder, is early enough even in a full `pytest tests` run. On a GPU
machine, `NUMBA_ENABLE_CUDASIM=0 pytest tests/cuda` runs the same tests on the hardware
plus the ones marked `gpu`.
"""
import os
import sys

import pytest

if "numba.cuda" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") is None:
    raise RuntimeError("numba.cuda was imported before tests/cuda/conftest.py could choose "
                       "the simulator; set NUMBA_ENABLE_CUDASIM explicitly")
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

try:
    from numba import cuda
except ImportError:  # numba-cuda not installed: skip the whole folder
    cuda = None


def pytest_collection_modifyitems(config, items):
    """Skip this folder without numba-cuda, and `gpu` tests without real hardware."""
    here = os.path.dirname(__file__)
    no_cuda = pytest.mark.skip(reason="numba-cuda is not installed (pip install 'nt[dev]')")
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    no_gpu = pytest.mark.skip(reason="needs a real NVIDIA GPU (running under the CUDA simulator)"
                              if simulated else "needs a real NVIDIA GPU (none found)")
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if cuda is None:
            item.add_marker(no_cuda)
        elif "gpu" in item.keywords and (simulated or not cuda.is_available()):
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _fast_simulator_switching():
    """The simulator runs each CUDA thread as a Python thread and polls them at every
    syncthreads; a short GIL switch interval makes those barriers ~10x faster."""
    old = sys.getswitchinterval()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)
