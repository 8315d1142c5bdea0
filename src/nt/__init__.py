"""nt: transformer training and inference where every op is a Numba kernel.

    import nt
    model = nt.models.GPT2(nt.models.GPT2Config.preset("mini", vocab_size=256))
    opt = nt.optim.AdamW(model.params, lr=1e-3, weight_decay=0.1)
    logits, loss = model(x, y)        # forward
    model.zero_grad(); model.backward(); opt.step()
"""
import os

# nt leaves OpenMP's wait policy to libgomp's default: a worker spins 300000 times (of the
# order of a millisecond) after a parallel region, then sleeps. nt used to set PASSIVE (sleep
# at once) because spinning Numba workers took the cores OpenBLAS's own threads needed for
# the next sgemm; training's matmuls now run as single-threaded BLAS slabs inside Numba's
# parallel loop (kernels/cpu/matmul.py), so nothing waits for those cores. PASSIVE cost
# decoding, which runs ~33 short parallel regions per token (a sleeping worker is woken
# for each), and PyTorch when imported after nt (it inherits the setting). Measured on the
# 2-core VM under other jobs' load, 2026-11-30 (docs/inference.md, "Threads"): 58M Llama
# Q4_0 decode on 2 threads, best of 3 runs, 253 tok/s PASSIVE vs 376 default spin (434
# ACTIVE), 1 thread 239-278; a PyTorch layer after `import nt` 167 ms PASSIVE vs 102 ms
# alone; d12 B=4 T=64 training, alternating: PASSIVE 1429 ms/step vs default spin 1354
# and 1394 (GOMP_SPINCOUNT=300000). ACTIVE (spin without end) is not the default: when
# another process wants a core, a spinning team stalls (d12 training 5.2 s/step).
# A value the user sets (OMP_WAIT_POLICY, GOMP_SPINCOUNT) is used as it is.
# OpenBLAS's idle workers spin for 2^28 cycles (about 0.1 s) after each call, on the cores
# the next Numba kernel needs. 2^12 cycles keeps them spinning only between back-to-back
# BLAS calls. Measured on 2 cores: a d6 B=8 T=256 training step 2906 -> 2543 ms, d12 B=4
# T=64 1470 -> 1342 ms. OpenBLAS reads it when it loads (nt's first kernel import), so it
# is set here.
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
