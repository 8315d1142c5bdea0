"""Gradient accumulation, loss scaling / NaN guard, clipping and LR schedules (with GPT-2 tiny)."""
import json
import math

import numpy as np
import pytest

from nt.models import GPT2, GPT2Config
from nt.optim import (SGD, Adam, AdamW, Chuck, ConstantSchedule, CosineSchedule, GradScaler, LinearSchedule,
                      StepSchedule, clip_factor, clip_grad_norm, grad_norm, schedule_from_state)
from nt.train_utils import accumulate_grads

CFG = GPT2Config.preset("tiny", vocab_size=64, block_size=16, n_embd=32)


def batch(B, T=16, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32)
    return idx, np.roll(idx, -1, axis=1)


# ---------------------------------------------------------------- accumulation

@pytest.mark.parametrize("K", [2, 4])
def test_k_micro_batches_give_the_grads_of_one_batch(K):
    B = 8
    idx, targets = batch(B)
    model = GPT2(CFG, dtype=np.float64)
    model.zero_grad()
    _, loss = model(idx, targets)
    model.backward()
    full = model.params.grad.copy()

    micro = iter([(idx[i:i + B // K], targets[i:i + B // K]) for i in range(0, B, B // K)])
    mean_loss = accumulate_grads(model, micro.__next__, K)
    np.testing.assert_allclose(model.params.grad, full, rtol=0, atol=1e-10)
    assert abs(np.max(np.abs(full))) > 1e-3  # the grads compared are not trivially zero
    assert mean_loss == pytest.approx(loss, abs=1e-12)


def test_accumulate_grads_needs_a_batch():
    with pytest.raises(ValueError, match="micro-batch"):
        accumulate_grads(GPT2(CFG), lambda: batch(2), 0)


def test_accumulation_from_a_loader_that_reuses_its_arrays():
    """DataLoader writes every batch into the same two arrays: K micro-batches drawn from it
    must be K different batches, with the grads of one batch of B*K."""
    from nt.data import DataLoader
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, 4000)
    K, B, T = 3, 2, 16
    model = GPT2(CFG, dtype=np.float64)
    loader = DataLoader(tokens, B, T, shuffle=True, seed=1)
    seen = []

    def next_batch():
        x, y = loader.next_batch()
        seen.append(x.copy())
        return x, y
    accumulate_grads(model, next_batch, K)
    accumulated = model.params.grad.copy()
    assert len({s.tobytes() for s in seen}) == K  # K different micro-batches

    big_x, big_y = DataLoader(tokens, B * K, T, shuffle=True, seed=1).next_batch()
    np.testing.assert_array_equal(np.concatenate(seen), big_x)  # together: what B*K reads
    model.zero_grad()
    model(big_x, big_y)
    model.backward()
    np.testing.assert_allclose(accumulated, model.params.grad, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- loss scaling

def test_scaled_backward_gives_the_same_update_float32():
    idx, targets = batch(4)
    plain, scaled = GPT2(CFG), GPT2(CFG)
    opt_p, opt_s = AdamW(plain.params, lr=1e-3), AdamW(scaled.params, lr=1e-3)
    scaler = GradScaler(scaled.params, init_scale=2.0 ** 12, growth_interval=0)
    for _ in range(3):
        plain.zero_grad()
        plain(idx, targets)
        plain.backward()
        opt_p.step()
        scaled.zero_grad()
        scaled.forward(idx, targets)
        scaler.backward(scaled.tape, scaled.loss)
        assert grad_norm(scaled.params) > 1000 * grad_norm(plain.params)  # the grads came out scaled
        assert scaler.step(opt_s)
        np.testing.assert_allclose(scaled.params.grad, plain.params.grad, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(scaled.params.flat, plain.params.flat, rtol=1e-5, atol=1e-7)
    assert (scaler.total_steps, scaler.skipped_steps, scaler.scale) == (3, 0, 2.0 ** 12)


def test_non_finite_grads_skip_the_step_and_back_off():
    idx, targets = batch(4)
    model = GPT2(CFG)
    opt = AdamW(model.params, lr=1e-3)
    scaler = GradScaler(model.params, init_scale=1024.0, growth_interval=2)
    before = model.params.flat.copy()
    model.forward(idx, targets)
    scaler.backward(model.tape, model.loss)
    model.params.grad[123] = np.inf  # an overflow somewhere
    assert not scaler.step(opt)
    assert np.array_equal(model.params.flat, before) and opt.step_count == 0
    assert not np.any(model.params.grad)  # zeroed
    assert (scaler.scale, scaler.skipped_steps, scaler.total_steps) == (512.0, 1, 1)
    # two clean steps in a row double the scale again
    for _ in range(2):
        model.zero_grad()
        accumulate_grads(model, lambda: (idx, targets), 1, scaler)
        assert scaler.unscale_()
        clip_grad_norm(model.params, 1.0)
        assert scaler.step(opt)
    assert (scaler.scale, scaler.skipped_steps, scaler.total_steps, opt.step_count) == (1024.0, 1, 3, 2)
    model.params.grad[7] = np.nan
    assert not scaler.unscale_()
    with pytest.raises(RuntimeError, match="already"):
        scaler.unscale_()
    scaler.update()
    assert scaler.skipped_steps == 2


def test_scaler_state_round_trip_and_bad_input():
    model = GPT2(CFG)
    a = GradScaler(model.params, init_scale=8.0, growth_interval=3)
    a.scale, a.good_steps, a.skipped_steps, a.total_steps = 4.0, 2, 5, 40
    b = GradScaler(model.params)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError):
        GradScaler(model.params, backoff_factor=0.0)
    with pytest.raises(RuntimeError, match="update"):
        b.update()


# ---------------------------------------------------------------- clipping

def test_clip_grad_norm():
    model = GPT2(CFG, dtype=np.float64)
    g = np.random.default_rng(0).standard_normal(model.params.size)
    model.params.grad[:] = g
    norm = clip_grad_norm(model.params, 1.0)
    assert norm == pytest.approx(np.linalg.norm(g), rel=1e-12)
    assert grad_norm(model.params) == pytest.approx(1.0, rel=1e-5)
    model.params.grad[:] = g * 1e-6
    clip_grad_norm(model.params, 1.0)  # below the limit: untouched
    assert np.array_equal(model.params.grad, g * 1e-6)
    model.params.grad[0] = np.inf
    assert math.isinf(clip_grad_norm(model.params, 1.0)) and model.params.grad[1] == g[1] * 1e-6


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: Adam(p, lr=1e-2, weight_decay=0.01),
    lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: Chuck(p, lr=1e-2, weight_decay=0.1, gnorm_ratio=2.0, trend_window=0, noise_patience=0,
                    patience=0),
])
def test_clip_inside_the_update_equals_clipping_the_grads(make):
    """step(grad_scale=clip_factor(...)) is clip_grad_norm then step(), without the pass
    that rewrites the grads: the grads stay as the backward left them."""
    rng = np.random.default_rng(1)
    a, b = GPT2(CFG, dtype=np.float64, seed=0), GPT2(CFG, dtype=np.float64, seed=0)
    grads = [rng.standard_normal(a.params.size) * 40.0 / np.sqrt(a.params.size) * s for s in (3.0, 0.5, 5.0)]
    opt_a, opt_b = make(a.params), make(b.params)
    factors = []
    for g in grads:  # norms ~120 (clipped to 40), ~20 (left alone), ~200 (clipped)
        a.params.grad[:] = g
        clip_grad_norm(a.params, 40.0)
        opt_a.step()
        b.params.grad[:] = g
        norm, factor = clip_factor(b.params, 40.0)
        assert norm == pytest.approx(np.linalg.norm(g), rel=1e-12)
        assert factor == (1.0 if norm <= 40.0 else pytest.approx(40.0 / (norm + 1e-6), rel=1e-12))
        factors.append(factor)
        opt_b.step(grad_scale=factor)
        assert np.array_equal(b.params.grad, g)
        np.testing.assert_allclose(b.params.flat, a.params.flat, rtol=1e-12, atol=1e-14)
    assert factors[0] < 1.0 and factors[1] == 1.0 and factors[2] < 1.0


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: Chuck(p, lr=1e-2, weight_decay=0.1, gnorm_ratio=2.0, trend_window=0, noise_patience=0,
                    patience=0),
])
def test_clip_scale_on_the_device_equals_clip_factor(make):
    """step(grad_scale=opt.clip_scale(c)) (the factor made and read where the grads live)
    updates bit for bit as step(grad_scale=clip_factor(...)[1]); its buffer holds the norm."""
    rng = np.random.default_rng(4)
    a, b = GPT2(CFG, seed=0), GPT2(CFG, seed=0)
    opt_a, opt_b = make(a.params), make(b.params)
    for s in (3.0, 0.5, 5.0):
        g = (rng.standard_normal(a.params.size) * s / np.sqrt(a.params.size)).astype(np.float32)
        a.params.grad[:] = g
        b.params.grad[:] = g
        norm, factor = clip_factor(a.params, 1.0)
        opt_a.step(grad_scale=factor)
        buf = opt_b.clip_scale(1.0)
        assert (buf[0], buf[1]) == (factor, norm)
        opt_b.step(grad_scale=buf)
        assert np.array_equal(a.params.flat, b.params.flat)
    with pytest.raises(ValueError, match="grad_scale"):
        opt_b.step(grad_scale=np.ones(1, np.float32))


@pytest.mark.parametrize("make", [
    lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: Chuck(p, lr=1e-2, weight_decay=0.1, freeze_threshold=1e-3, freeze_patience=1, trend_window=0,
                    noise_patience=0, patience=0),
])
def test_step_zero_grad_leaves_zero_grads_and_the_same_update(make):
    """step(zero_grad=True) is step() then params.zero_grad(), in one pass: the same
    parameters and moments bit for bit, the grads zero (a frozen tensor's too)."""
    rng = np.random.default_rng(5)
    a, b = GPT2(CFG, seed=0), GPT2(CFG, seed=0)
    opt_a, opt_b = make(a.params), make(b.params)
    for t in range(3):
        g = rng.standard_normal(a.params.size).astype(np.float32)
        g[:opt_b._seg_offsets[1]] *= 1e-9  # the first tensor below Chuck's freeze threshold: frozen
        a.params.grad[:] = g
        b.params.grad[:] = g
        opt_a.step(grad_scale=0.5)
        a.params.zero_grad()
        opt_b.step(grad_scale=0.5, zero_grad=True)
        assert not b.params.grad.any()
        assert np.array_equal(a.params.flat, b.params.flat)
        assert np.array_equal(opt_a.m, opt_b.m) and np.array_equal(opt_a.v, opt_b.v)
    if isinstance(opt_b, Chuck):
        assert opt_b.stats()["frozen"] >= 1


# ---------------------------------------------------------------- schedules

def test_schedules_values():
    cos = CosineSchedule(1.0, warmup=10, total=110, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = LinearSchedule(2.0, warmup=0, total=100, min_ratio=0.0)
    assert lin(0) == 2.0 and lin(50) == pytest.approx(1.0) and lin(100) == 0.0 and lin(200) == 0.0
    step = StepSchedule(1.0, warmup=5, step_size=10, gamma=0.5)
    assert step(4) == 1.0 and step(14) == 1.0 and step(15) == 0.5 and step(35) == 0.125
    assert ConstantSchedule(0.3, warmup=3)(1) == pytest.approx(0.2)
    lrs = [cos(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warmup


@pytest.mark.parametrize("sched", [CosineSchedule(3e-4, 100, 1000), LinearSchedule(1e-3, 10, 50, 0.1),
                                   StepSchedule(0.1, 0, 30, 0.3), ConstantSchedule(1e-3, 5)])
def test_schedule_state_round_trip(sched):
    state = json.loads(json.dumps(sched.state_dict()))
    again = schedule_from_state(state)
    assert type(again) is type(sched) and [again(s) for s in range(0, 1200, 7)] == [sched(s) for s in range(0, 1200, 7)]
    other = type(sched)(**{**{k: v for k, v in state.items() if k != "type"}, "lr": 9.0})
    other.load_state_dict(state)
    assert other(123) == sched(123)


def test_schedule_bad_input():
    with pytest.raises(ValueError):
        CosineSchedule(1.0, warmup=-1, total=10)
    with pytest.raises(ValueError):
        StepSchedule(1.0, 0, step_size=0)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_from_state({"type": "Nope"})
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0, 10).load_state_dict(LinearSchedule(1.0, 0, 10).state_dict())
