"""Every CUDA kernel compiles with the real CUDA compiler (libNVVM) and fits a GPU's
resources (ptxas), without a GPU.

The simulator executes kernels as Python and so cannot see typing or lowering errors that
only the CUDA target has, nor registers, spills or memory; ptx_check.py compiles each
kernel to PTX (float32 by default, float64 with -m slow) and assembles it with ptxas for
sm_80 and sm_90. It runs in a subprocess because this process has numba.cuda in simulator mode.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def _have_compiler() -> bool:
    """libNVVM and NVRTC (numba-cuda's compilers) load, and ptxas is found."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        load_nvidia_dynamic_lib("nvvm")
        load_nvidia_dynamic_lib("nvrtc")
    except Exception:
        return False
    sys.path.insert(0, HERE)
    try:
        from ptxas_resources import find_ptxas
    except Exception:
        return False
    finally:
        sys.path.remove(HERE)
    return find_ptxas() is not None


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)


needs_compiler = pytest.mark.skipif(not _have_compiler(), reason="libNVVM/NVRTC or ptxas not found (pip install "
                                    "nvidia-nvvm nvidia-cuda-nvrtc nvidia-cuda-nvcc, all in nt[dev])")


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_every_kernel_compiles_and_fits(dtype, tmp_path):
    """No kernel fails to compile, spills, or exceeds the local / shared memory budgets,
    and the report covers every kernel on both architectures."""
    report = tmp_path / "resources.json"
    run = _run(os.path.join(HERE, "ptx_check.py"), "--resources", "--json", str(report), dtype)
    fails = "\n".join(line for line in run.stdout.splitlines() if line.startswith("FAIL"))
    assert run.returncode == 0, fails or run.stdout[-5000:] + run.stderr[-5000:]
    assert "0 kernels failed" in run.stdout and "0 resource-check failures" in run.stdout
    table = json.loads(report.read_text())
    assert len(table) > 50 and all(set(per_arch) == {"sm_80", "sm_90"} for per_arch in table.values())
    assert all(r["registers"] > 0 for per_arch in table.values() for r in per_arch.values())


@needs_compiler
def test_resource_check_rejects_bad_kernels(tmp_path):
    """A local-memory array, a kernel that spills, and 64 KB of static shared memory each fail."""
    run = _run(os.path.join(HERE, "ptx_bad_kernels.py"), str(tmp_path / "cache.json"))
    assert run.returncode == 0, run.stderr[-5000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert any("local-memory budget" in p for p in found["local_array"])
    assert any("spills registers" in p for p in found["many_live"])
    assert any("shared memory" in p for p in found["big_shared"])


def test_ptxas_output_parsing():
    """parse_ptxas reads registers, shared, stack and spills from ptxas -v's lines."""
    sys.path.insert(0, HERE)
    try:
        from ptxas_resources import parse_ptxas, problems
    finally:
        sys.path.remove(HERE)
    text = ("ptxas info    : Function properties for _Z1k\n"
            "    48 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]\n")
    res = parse_ptxas(text)
    assert res == {"registers": 40, "shared": 4096, "stack": 48, "spill_stores": 8, "spill_loads": 12}
    assert problems(res) == ["spills registers (8 B stored, 12 B loaded)"]
    assert problems(dict(res, spill_stores=0, spill_loads=0)) == []
