"""Fixtures for the fine-tuning tests."""
import numpy as np
import pytest


@pytest.fixture
def submodule_array_args(monkeypatch):
    """count(module) wraps every Numba kernel of a kernel submodule that ops reach as
    `k.<family>.<kernel>` (not exported by the backend package, so helpers'
    measure_step_allocations does not see them) and returns a one-element list counting
    the NumPy arrays handed to them: Numba records one MemInfo per such array."""
    def count(module):
        seen = [0]
        for name in dir(module):
            fn = getattr(module, name)
            if hasattr(fn, "py_func"):
                def counting(*args, fn=fn):
                    seen[0] += sum(isinstance(a, np.ndarray) for a in args)
                    return fn(*args)
                monkeypatch.setattr(module, name, counting)
        return seen
    return count
