"""Every optimizer in nt.optim runs on CUDA parameters and matches the CPU step for step:
SGD (momentum, Nesterov), Adam, AdamW, Chuck with all its mechanisms, and GradScaler."""
import numpy as np
import pytest

import nt
from nt.optim import SGD, Adam, AdamW, Chuck, GradScaler

LAYOUT = [("w", (6, 5), True), ("b", (5,), False), ("e", (40,), True)]


def make(device):
    params = nt.Params(nt.backend(device), np.float64, LAYOUT)
    params.k.copy_(params.flat, np.random.default_rng(0).standard_normal(params.size))
    return params


OPTIMIZERS = [
    lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: Adam(p, lr=1e-2, weight_decay=0.01),
    lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: Chuck(p, lr=1e-2, weight_decay=0.1, seed=3),
]


@pytest.mark.filterwarnings("ignore:overflow encountered")  # Chuck's noise hash under the simulator
@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam", "adamw", "chuck"])
def test_optimizer_steps_match_cpu(make_opt):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(75) * (0.1 + i) for i in range(4)]
    losses = [3.0, 2.5, 2.6, 2.4]
    flat = {}
    for device in ("cpu", "cuda"):
        params = make(device)
        opt = make_opt(params)
        for g, loss in zip(grads, losses):
            params.k.copy_(params.grad, g)
            opt.step(loss=loss) if isinstance(opt, Chuck) else opt.step()
        flat[device] = np.array(params.k.to_host(params.flat))
    np.testing.assert_allclose(flat["cuda"], flat["cpu"], rtol=1e-10, atol=1e-12)


def test_grad_scaler_skips_inf_on_cuda():
    for device in ("cpu", "cuda"):
        params = make(device)
        opt = AdamW(params, lr=1e-2)
        scaler = GradScaler(params, init_scale=4.0)
        g = np.full(75, 8.0)
        g[3] = np.inf
        params.k.copy_(params.grad, g)
        before = np.array(params.k.to_host(params.flat))
        assert scaler.step(opt) is False  # an inf grad: the step is skipped
        np.testing.assert_array_equal(params.k.to_host(params.flat), before)
