"""Memory that a run does not need is never made: a parameter buffer's grad mirror exists only
once something asks for grads (a backward, an optimizer), so inference pays nothing for it."""
import numpy as np

from nt.models import GPT2, GPT2Config
from nt.optim import AdamW
from nt.tensor import Params


def tiny():
    return GPT2(GPT2Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)


def test_inference_makes_no_grads():
    model = tiny()
    ids = np.arange(8, dtype=np.int32).reshape(1, 8)
    model.forward(ids)
    assert model.params.arena._gbuf is None
    assert model.params.arena.nbytes == 4 * model.params.size    # values only


def test_grads_start_at_zero_when_made():
    p = Params("cpu", np.float32, [("w", (3, 5), True), ("b", (5,), False)])
    p.zero_grad()                        # nothing made yet: nothing to zero
    assert p.arena._gbuf is None
    assert p["w"].grad.shape == (3, 5) and not p["w"].grad.any() and not p.grad.any()
    assert p.arena.nbytes == 2 * 4 * p.size


def test_training_after_lazy_grads_matches_eager_zero():
    """The first step (grads made by the backward) equals one where zero_grad made them first."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (2, 8)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    grads = []
    for zero_first in (False, True):
        model = tiny()
        if zero_first:
            model.params.grad.fill(1.0)
            model.zero_grad()
        model.forward(x, y)
        model.backward()
        grads.append(model.params.grad.copy())
        opt = AdamW(model.params, lr=1e-3)
        opt.step()
    assert grads[0].any()
    np.testing.assert_array_equal(grads[0], grads[1])


SCIPY_LINALG = """
import json, sys
import numpy as np
import nt
nt.backend("cpu").fill_(np.zeros(16, np.float32), 0.0)    # starts Numba's CPU target
state = {"loaded_before_use": [m for m in ("numpy.f2py", "numpy.testing", "scipy.linalg._basic") if m in sys.modules]}
import scipy.linalg.cython_blas
from scipy.linalg import lu_factor
import scipy
state["solve"] = scipy.linalg.solve(np.eye(2), np.ones(2)).tolist()
state["same"] = scipy.linalg is sys.modules["scipy.linalg"] and callable(lu_factor)
state["cython_blas"] = scipy.linalg.cython_blas is sys.modules["scipy.linalg.cython_blas"]
print(json.dumps(state))
"""


def test_scipy_linalg_loads_only_when_used():
    """Numba's first kernel imports scipy.linalg.cython_blas; the package's body (13 MiB of
    modules nt never uses) waits until something asks scipy.linalg for an attribute."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", SCIPY_LINALG], capture_output=True, text=True, check=True)
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state == {"loaded_before_use": [], "solve": [1.0, 1.0], "same": True, "cython_blas": True}
