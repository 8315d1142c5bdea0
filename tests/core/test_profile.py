import numpy as np

import nt
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW
from nt.profile import Profiler


def test_profiler_counts_every_kernel_and_restores_the_backend():
    cfg = GPT2Config.preset("tiny", vocab_size=64, n_layer=3)
    model = GPT2(cfg, seed=0)
    opt = AdamW(model.params)
    x = np.zeros((2, 8), np.int32)
    with Profiler(model, opt) as prof:
        for _ in range(2):
            model.forward(x, x)
            model.zero_grad()
            model.backward()
            opt.step()
    calls = {name: entry[0] for name, entry in prof.stats.items()}
    assert calls["matmul_forward"] == 2 * (4 * cfg.n_layer + 1)  # 4 linears per block + classifier
    assert calls["attention_backward"] == 2 * cfg.n_layer
    assert calls["adam_update"] == 2
    table = prof.table()
    assert "matmul_backward" in table and "arena params+grads" in table and "optimizer" in table
    assert model.tape.k is nt.backend("cpu") and opt.k is nt.backend("cpu")
