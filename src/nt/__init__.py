"""nt: transformer training and inference where every op is a Numba kernel.

    import nt
    model = nt.models.GPT2(nt.models.GPT2Config.preset("mini", vocab_size=256))
    opt = nt.optim.AdamW(model.params, lr=1e-3, weight_decay=0.1)
    logits, loss = model(x, y)        # forward
    model.zero_grad(); model.backward(); opt.step()
"""
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
