"""Every optimizer, behind GradScaler + clipping, with a state save/load mid-run, gives the
same parameters and state on the CUDA backend as on the CPU (float64): the optimizers only
call kernels through params.k and move data with to_host/to_device."""
import numpy as np
import pytest

pytest.importorskip("nt.kernels.cuda")  # the CUDA backend (and tests/cuda/conftest.py's simulator)

import nt  # noqa: E402
from nt.optim import SGD, Adam, AdamW, Chuck, GradScaler, clip_factor, clip_grad_norm  # noqa: E402

LAYOUT = [("w", (6, 5), True), ("b", (5,), False), ("e", (40,), True), ("g", (3,), False)]
CHUCK = dict(lr=1e-2, weight_decay=0.1, loss_beta=0.5, trend_window=5, damp_min=0.3, gnorm_beta=0.9,
             gnorm_ratio=1.5, noise_patience=3, noise_scale=5.0, seed=3, freeze_threshold=1e-4,
             freeze_patience=2, patience=4, lr_decay=0.5, lr_floor=0.2)
FACTORIES = {
    "sgd": lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda p: Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw": lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    "chuck": lambda p: Chuck(p, **CHUCK),
}


def _inputs():
    rng = np.random.default_rng(1)
    out = []
    for t, loss in enumerate([3.0, 2.5, 2.6, 2.55, 2.6, 2.58, 2.6, 2.61]):
        g = rng.standard_normal(78)
        g[75:] *= 1e-6 if 2 <= t < 6 else 1.0  # "g" freezes (Chuck)
        g[:30] *= 10.0 if t == 3 else 1.0       # "w" spikes (Chuck scales it)
        out.append((g, loss))
    return out


def _run(device, name):
    k = nt.backend(device)
    params = nt.Params(device, np.float64, LAYOUT)
    k.copy_(params.flat, k.to_device(np.random.default_rng(0).standard_normal(params.size)))
    opt = FACTORIES[name](params)
    scaler = GradScaler(params, init_scale=4.0, growth_interval=3)
    for i, (g, loss) in enumerate(_inputs()):
        scaled = g * scaler.scale
        if i == 5:
            scaled[10] = np.inf  # skipped, counted, scale halved
        k.copy_(params.grad, k.to_device(scaled))
        if scaler.unscale_():
            clip_grad_norm(params, 50.0)
        scaler.step(opt, **({"loss": loss} if name == "chuck" else {}))
        if i == 3:  # resume from a state_dict mid-run
            state = opt.state_dict()
            opt = FACTORIES[name](params)
            opt.load_state_dict(state)
    return np.array(k.to_host(params.flat)), opt.state_dict(), scaler.state_dict()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_optimizer_on_cuda_matches_cpu(name):
    cpu, cuda = _run("cpu", name), _run("cuda", name)
    np.testing.assert_allclose(cuda[0], cpu[0], rtol=1e-12, atol=1e-14)
    for key, value in cpu[1].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(cuda[1][key], value, rtol=1e-12, atol=1e-14, err_msg=key)
        elif isinstance(value, float):
            assert cuda[1][key] == pytest.approx(value, rel=1e-12), key
        else:
            assert cuda[1][key] == value, key
    assert cuda[2] == cpu[2] and cpu[2]["skipped_steps"] == 1
    if name == "chuck":
        assert cpu[1]["noise_events"] >= 1 and np.any(cpu[1]["tensor_steps"] < cpu[1]["step_count"])


def _run_device_clip(device, name):
    """Clipping by the device-resident factor (clip_scale) and zeroing inside the update."""
    k = nt.backend(device)
    params = nt.Params(device, np.float64, LAYOUT)
    k.copy_(params.flat, k.to_device(np.random.default_rng(0).standard_normal(params.size)))
    opt = FACTORIES[name](params)
    buffers = []
    for g, loss in _inputs()[:4]:
        k.copy_(params.grad, k.to_device(g * 7.0))
        buf = opt.clip_scale(10.0)
        buffers.append(np.array(k.to_host(buf)))
        opt.step(grad_scale=buf, **({"loss": loss} if name == "chuck" else {}),
                 **({} if name == "sgd" else {"zero_grad": True}))
        if name != "sgd":
            assert not np.any(k.to_host(params.grad))
    return np.array(k.to_host(params.flat)), np.array(buffers)


@pytest.mark.parametrize("name", ["sgd", "adamw", "chuck"])
def test_device_clip_scale_and_zero_grad_match_cpu(name):
    (cpu, cpu_buf), (cuda, cuda_buf) = _run_device_clip("cpu", name), _run_device_clip("cuda", name)
    np.testing.assert_allclose(cuda_buf, cpu_buf, rtol=1e-12)
    assert np.all(cpu_buf[:, 0] < 1.0)  # every step clipped
    np.testing.assert_allclose(cuda, cpu, rtol=1e-12, atol=1e-14)


def test_clip_scale_non_finite_norm_gives_factor_one():
    params = nt.Params("cuda", np.float64, LAYOUT)
    g = np.ones(params.size)
    g[3] = np.inf
    params.k.copy_(params.grad, params.k.to_device(g))
    opt = AdamW(params)
    factor, norm = params.k.to_host(opt.clip_scale(1.0))
    assert factor == 1.0 and np.isinf(norm) and clip_factor(params, 1.0) == (norm, factor)
