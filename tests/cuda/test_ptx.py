"""Every CUDA kernel compiles with the real CUDA compiler (libNVVM), without a GPU.

The simulator executes kernels as Python and so cannot see typing or lowering errors that
only the CUDA target has; ptx_check.py compiles each kernel to PTX (float32 by default, float64 with -m slow).
It runs in a subprocess because this process has numba.cuda in simulator mode.
"""
import os
import subprocess
import sys

import pytest


def _have_compiler() -> bool:
    """libNVVM and NVRTC, the two libraries numba-cuda compiles with, can be loaded."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        load_nvidia_dynamic_lib("nvvm")
        load_nvidia_dynamic_lib("nvrtc")
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _have_compiler(), reason="libNVVM/NVRTC not found "
                    "(pip install nvidia-nvvm nvidia-cuda-nvrtc, both in nt[dev])")
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_every_kernel_compiles_to_ptx(dtype):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    script = os.path.join(os.path.dirname(__file__), "ptx_check.py")
    run = subprocess.run([sys.executable, script, dtype], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert "0 kernels failed" in run.stdout
