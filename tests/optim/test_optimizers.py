"""Optimizers vs plain-NumPy references (float64, 1e-12), state round trips, allocation, bad input."""
import json

import numpy as np
import pytest

import nt
from nt.optim import OPTIMIZERS, SGD, Adam, AdamW, Chuck, GradScaler, clip_grad_norm, make_optimizer
from helpers import measure_step_allocations
from optim_reference import AdamRef, ChuckRef, SGDRef

LAYOUT = [("w", (6, 5), True), ("b", (5,), False), ("e", (40,), True), ("g", (3,), False)]
SIZES = [30, 5, 40, 3]


def make(dtype=np.float64, seed=0) -> nt.Params:
    params = nt.Params("cpu", dtype, LAYOUT)
    params.flat[:] = np.random.default_rng(seed).standard_normal(params.size)
    return params


def grads(steps: int, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n) for _ in range(steps)]


# a run that exercises all of Chuck's mechanisms: grad spikes on "w" (b), "g" tiny for
# steps 5..14 (d), losses falling, then a zigzag plateau (a, c, e), then falling again
CHUCK_HP = dict(lr=1e-2, weight_decay=0.1, loss_beta=0.5, trend_window=5, damp_min=0.3, gnorm_beta=0.9,
                gnorm_ratio=1.5, noise_patience=4, noise_scale=5.0, seed=3, freeze_threshold=1e-4,
                freeze_patience=3, patience=6, lr_decay=0.5, lr_floor=0.2)


def chuck_inputs(steps: int = 40):
    out = []
    for t, g in enumerate(grads(steps, sum(SIZES), seed=2)):
        if t in (8, 20):
            g[:30] *= 10.0
        if 5 <= t < 15:
            g[75:] *= 1e-6
        loss = 3.0 - 0.1 * t if t < 10 else 2.2 + 0.05 * (-1) ** t if t < 30 else 2.0 - 0.05 * (t - 30)
        out.append((g, loss))
    return out


@pytest.mark.parametrize("momentum,dampening,wd,nesterov", [
    (0.0, 0.0, 0.0, False), (0.9, 0.0, 0.1, False), (0.9, 0.3, 0.05, False), (0.8, 0.0, 0.1, True)])
def test_sgd_matches_numpy(momentum, dampening, wd, nesterov):
    params = make()
    ref = SGDRef(params.flat, params.decay_mask(), 0.05, momentum, dampening, wd, nesterov)
    opt = SGD(params, lr=0.05, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    for g in grads(6, params.size):
        params.grad[:] = g
        opt.step()
        ref.step(g)
        np.testing.assert_allclose(params.flat, ref.p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,decoupled", [(Adam, False), (AdamW, True)])
def test_adam_and_adamw_match_numpy(cls, decoupled):
    params = make()
    ref = AdamRef(params.flat, params.decay_mask(), 1e-2, (0.8, 0.95), 1e-8, 0.1, decoupled)
    opt = cls(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for t, g in enumerate(grads(6, params.size)):
        params.grad[:] = g
        lr = 1e-2 if t % 2 else None  # the per-step override gives the same lr here
        opt.step(lr=lr)
        ref.step(g)
        np.testing.assert_allclose(params.flat, ref.p, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(opt.m, ref.m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(opt.v, ref.v, rtol=1e-12, atol=1e-14)


def test_adam_and_adamw_differ_only_by_decay_placement():
    a, b = make(), make()
    ga = grads(1, a.size)[0]
    a.grad[:] = b.grad[:] = ga
    Adam(a, lr=1e-2, weight_decay=0.0).step()
    AdamW(b, lr=1e-2, weight_decay=0.0).step()
    assert np.array_equal(a.flat, b.flat)
    # decay touches only the parameters declared with it
    c = make()
    c.grad[:] = ga
    AdamW(c, lr=1e-2, weight_decay=0.5).step()
    nodecay = c.decay_mask() == 0
    assert np.array_equal(c.flat[nodecay], b.flat[nodecay]) and not np.array_equal(c.flat, b.flat)


def test_chuck_matches_numpy_with_every_mechanism_active():
    params = make()
    ref = ChuckRef(params.flat, params.decay_mask(), SIZES, **CHUCK_HP)
    opt = Chuck(params, **CHUCK_HP)
    seen = {"frozen": 0, "scaled": 0, "damp_min": 1.0}
    for g, loss in chuck_inputs():
        params.grad[:] = g
        opt.step(loss=loss)
        ref.step(g, loss)
        np.testing.assert_allclose(params.flat, ref.p, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(opt.m, ref.m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(opt.v, ref.v, rtol=1e-12, atol=1e-14)
        assert (opt.damp, opt.lr_mult) == pytest.approx((ref.damp, ref.lr_mult), rel=1e-15)
        st = opt.stats()
        seen["frozen"] += st["frozen"]
        seen["scaled"] += st["scaled"]
        seen["damp_min"] = min(seen["damp_min"], st["damp"])
    # every mechanism actually fired in this run
    assert seen["frozen"] > 0 and seen["scaled"] > 0 and seen["damp_min"] < 0.5
    assert opt.noise_events == ref.events > 0 and opt.lr_mult < 1.0
    assert opt.damp > seen["damp_min"]  # recovered while the loss fell again
    assert list(opt.tensor_steps) == list(ref.tsteps) and opt.tensor_steps[3] < opt.step_count


FACTORIES = {
    "sgd": lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adam": lambda p: Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw": lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    "chuck": lambda p: Chuck(p, **CHUCK_HP),
}
DEFAULTS = {"sgd": lambda p: SGD(p), "adam": lambda p: Adam(p), "adamw": lambda p: AdamW(p),
            "chuck": lambda p: Chuck(p)}


def _step(opt, g, loss):
    opt.params.grad[:] = g
    if isinstance(opt, Chuck):
        opt.step(loss=loss)
    else:
        opt.step()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_round_trip_resumes_bit_for_bit(name):
    inputs = chuck_inputs(30)
    straight = FACTORIES[name](make())
    for g, loss in inputs:
        _step(straight, g, loss)

    first = FACTORIES[name](make())
    for g, loss in inputs[:13]:
        _step(first, g, loss)
    state, values = first.state_dict(), first.params.flat.copy()
    # what a checkpoint does: arrays to a tensor file, scalars to JSON
    scalars = json.loads(json.dumps({k: v for k, v in state.items() if not isinstance(v, np.ndarray)}))
    arrays = {k: v.copy() for k, v in state.items() if isinstance(v, np.ndarray)}

    params = make(seed=99)
    params.flat[:] = values
    resumed = DEFAULTS[name](params)  # other hyperparameters: the state restores them
    resumed.load_state_dict({**scalars, **arrays})
    for g, loss in inputs[13:]:
        _step(resumed, g, loss)

    assert np.array_equal(resumed.params.flat, straight.params.flat)
    a, b = resumed.state_dict(), straight.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(FACTORIES) + ["adamw+scaler"])
def test_steady_state_step_allocates_nothing(name, monkeypatch):
    """No kernel allocates (Numba's runtime counts one MemInfo per array argument and
    nothing more) and Python-side memory stays far below the size of the buffer."""
    params = nt.Params("cpu", np.float64, [("w", (400, 250), True), ("b", (250,), False)])
    params.grad[:] = np.random.default_rng(0).standard_normal(params.size)
    opt = FACTORIES[name.split("+")[0]](params)
    scaler = GradScaler(params, init_scale=1.0, growth_interval=0) if "scaler" in name else None

    def step():
        if scaler is not None:
            scaler.unscale_()
            clip_grad_norm(params, 1e9)
            scaler.step(opt)
        else:
            _step(opt, params.grad, 1.0)

    for _ in range(3):
        step()
    array_args, nrt_allocs, peak = measure_step_allocations(monkeypatch, params.k, step)
    assert array_args >= 4  # the kernels did run through the counter
    assert nrt_allocs == array_args, f"a kernel allocated in a {name} step"
    assert peak < params.size * 8 // 20, f"{name} step allocated {peak} bytes at peak"


def test_bad_hyperparameters_and_state():
    p = make()
    with pytest.raises(ValueError, match="nesterov"):
        SGD(p, nesterov=True)
    with pytest.raises(ValueError, match="invalid"):
        Adam(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="trend_window"):
        Chuck(p, trend_window=2)
    with pytest.raises(ValueError, match="loss"):
        Chuck(p).step()
    with pytest.raises(ValueError, match="loss"):
        Chuck(p).step(loss=float("nan"))
    Chuck(p, trend_window=0, noise_patience=0, patience=0).step()  # nothing watches the loss
    with pytest.raises(ValueError, match="Adam"):
        AdamW(p).load_state_dict(Adam(p).state_dict())
    bad = AdamW(p).state_dict()
    bad["m"] = np.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        AdamW(p).load_state_dict(bad)
    del bad["v"]
    with pytest.raises(ValueError, match="missing"):
        AdamW(p).load_state_dict(bad)
    bad = Chuck(p).state_dict()
    bad["gnorm_avg"] = np.zeros(7)
    with pytest.raises(ValueError, match="gnorm_avg"):
        Chuck(p).load_state_dict(bad)


def test_make_optimizer_by_name():
    p = make()
    for name, cls in OPTIMIZERS.items():
        opt = make_optimizer(name, p, lr=0.5, weight_decay=0.1)
        assert type(opt) is cls and opt.lr == 0.5 and opt.weight_decay == 0.1
    assert make_optimizer("adamw", p, 1e-3).beta2 == 0.95 and make_optimizer("sgd", p, 1e-3).momentum == 0.9
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lion", p, 1e-3)
