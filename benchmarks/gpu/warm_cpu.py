"""Compiles the CPU kernels that the train and decode stages' CPU references use, in the
background while the test stage keeps the GPU busy: with a fresh NUMBA_CACHE_DIR every
Numba kernel compiles cold (tens of seconds on the CPU side), and those stages are
time-boxed. Tiny shapes: compilation depends on types, not sizes."""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse  # noqa: E402


def main() -> None:
    parse(__doc__.splitlines()[0])
    import nt
    import train
    from nt.models import Llama, LlamaConfig
    model, opt, x, y = train.build("tiny", 2, 8, 64, "cpu", 1)
    train.step(model, opt, x, y)
    model.generate(x[0, :4], 2, temperature=0)
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=64, n_layers=1, tie_embeddings=False,
                             rope_pairing="interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("Q8_0", "Q4_0"):
            path = os.path.join(tmp, f"{kind}.gguf")
            nt.models.gguf.write(path, Llama(cfg, seed=0), kind)
            q = nt.models.from_gguf(path, keep_quantized=True)
            q.generate(np.arange(20, dtype=np.int32) % 64, 3, temperature=0)   # prefill (>= 16 rows) + decoding
    print("CPU kernels compiled")


if __name__ == "__main__":
    main()
