"""CUDA tests run in Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is set.

numba.cuda picks simulator or hardware once, when it is first imported, from numba's config
(which numba re-reads from the environment on reload_config()). Nothing outside the CUDA
backend imports numba.cuda (nt.backend loads nt.kernels.cuda lazily, and plain `import
numba` does not import it), so setting the default here and reloading the config, when
pytest collects this folder, is early enough even in a full `pytest tests` run. On a GPU
machine, `NUMBA_ENABLE_CUDASIM=0 pytest tests/cuda` runs the same tests on the hardware
plus the ones marked `gpu`.
"""
import os
import sys
import threading

import numpy as np
import pytest

if "numba.cuda" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") is None:
    raise RuntimeError("numba.cuda was imported before tests/cuda/conftest.py could choose "
                       "the simulator; set NUMBA_ENABLE_CUDASIM explicitly")
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# numba.cuda's config IS numba.core.config, read when numba was first imported (before this
# file): re-read the environment now, or numba.cuda would start in hardware mode.
from numba.core import config as _numba_config  # noqa: E402

_numba_config.reload_config()

try:
    from numba import cuda
except ImportError:  # numba-cuda not installed: skip the whole folder
    cuda = None


def _thread_safe_simulator_shared_arrays():
    """Make the simulator hand every thread of a block the same shared array.

    The simulator runs each CUDA thread as a Python thread, and its cuda.shared.array
    looks the array up by the caller's file and line and creates it when missing, with
    no lock: two threads can both miss, create separate arrays, and then reduce over
    different memory (a CI run summed garbage in a block reduction that way). This
    replacement does the same lookup under a lock. Dynamic shared memory (shape 0) has
    no such race and keeps the simulator's own code. Hardware runs are untouched.
    """
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    simulator_array = FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return simulator_array(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = np.empty(shape, np.dtype(dtype))
        return found

    FakeCUDAShared.array = array


if cuda is not None and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _thread_safe_simulator_shared_arrays()


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


@pytest.fixture
def device_allocations(monkeypatch):
    """A list that records the name of every device/pinned array numba.cuda makes from now
    on in the test (the no-allocation checks of a steady training step)."""
    from numba import cuda
    made = []
    for name in ("device_array", "to_device", "device_array_like", "pinned_array"):
        real = getattr(cuda, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            made.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(cuda, name, counting)
    return made
