"""nt: transformer training and inference where every op is a Numba kernel.

    import nt
    model = nt.models.GPT2(nt.models.GPT2Config.preset("mini", vocab_size=256))
    opt = nt.optim.AdamW(model.params, lr=1e-3, weight_decay=0.1)
    logits, loss = model(x, y)        # forward
    model.zero_grad(); model.backward(); opt.step()
"""
import os

# Numba's OpenMP workers spin after each parallel kernel by default, and the spinning
# threads take the cores OpenBLAS needs for the matmul that usually comes next: measured
# on 2 cores, an add kernel followed by a 1024x768x3072-class sgemm ran 2x slower than the
# sgemm alone. Passive waiting removes that. It must be set before the thread pool starts
# (the first parallel kernel), so it is set here; a value the user chose is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The same fight the other way round: OpenBLAS's idle workers spin for 2^28 cycles (about
# 0.1 s) after each call, on the cores the next Numba kernel needs. 2^12 cycles keeps them
# spinning only between back-to-back BLAS calls. Measured on 2 cores: a d6 B=8 T=256
# training step 2906 -> 2543 ms, d12 B=4 T=64 1470 -> 1342 ms. OpenBLAS reads it when it
# loads (nt's first kernel import), so it is set here too.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

from . import io, models, ops, optim, profile
from .backend import backend
from .tape import Tape
from .tensor import Arena, Params, Tensor

__version__ = "0.1.0"


def __getattr__(name: str):
    # nt.data and nt.tokenizer load on first use, so `python -m nt.data` runs the module
    # without importing it twice
    if name in ("data", "tokenizer"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nt' has no attribute {name!r}")


__all__ = ["Tape", "Tensor", "Arena", "Params", "backend", "ops", "optim", "models", "io", "data", "tokenizer", "profile"]
