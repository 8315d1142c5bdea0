"""Chuck's mechanisms, each alone (the others switched off), against their documented rules.

With every mechanism off Chuck is AdamW; with only (a) or (e) on it is AdamW at the lr
Chuck reports, bit for bit, so those tests compare against AdamW run beside it.
"""
import numpy as np
import pytest

import nt
from nt.optim import AdamW, Chuck, loss_trend
from optim_reference import gauss_ref

LAYOUT = [("w", (6, 5), True), ("b", (5,), False), ("e", (40,), True)]
W, B, E = slice(0, 30), slice(30, 35), slice(35, 75)
# all off, and the raw loss (no smoothing) so the expected sequences are easy to follow
OFF = dict(trend_window=0, gnorm_ratio=0, noise_patience=0, freeze_patience=0, patience=0, loss_beta=0.0)
LR = 1e-2


def make() -> nt.Params:
    params = nt.Params("cpu", np.float64, LAYOUT)
    params.flat[:] = np.random.default_rng(0).standard_normal(params.size)
    return params


def pair(**on):
    """A Chuck with only the mechanisms in `on` and an AdamW beside it, on equal params."""
    chuck = Chuck(make(), lr=LR, weight_decay=0.1, **{**OFF, **on})
    adamw = AdamW(make(), lr=LR, weight_decay=0.1)
    return chuck, adamw


def step_both(chuck, adamw, g, loss, adamw_lr=None):
    chuck.params.grad[:] = g
    adamw.params.grad[:] = g
    chuck.step(loss=loss)
    adamw.step(lr=chuck.last_lr if adamw_lr is None else adamw_lr)


def grad_seq(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(75) for _ in range(n)]


def test_all_off_is_adamw():
    chuck, adamw = pair()
    for g in grad_seq(5):
        step_both(chuck, adamw, g, None, adamw_lr=LR)
    assert np.array_equal(chuck.params.flat, adamw.params.flat)


# ---------------------------------------------------------------- (a) loss-trend damping

def test_loss_trend_slope_and_oscillation():
    slope, osc = loss_trend(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert slope == pytest.approx(1.0 / 3.0) and osc == 0.0       # slope 1 per step / mean 3
    slope, osc = loss_trend(np.array([2.0, 1.0, 2.0, 1.0, 2.0]))
    assert osc == 1.0
    slope, osc = loss_trend(np.array([5.0, 4.0, 4.5, 3.0, 2.0]))
    assert slope < 0 and osc == pytest.approx(2 / 3)
    slope, osc = loss_trend(np.full(16, 2.3))
    assert abs(slope) < 1e-15 and osc == 0.0


def test_damping_down_on_rise_floor_then_up_on_fall_capped_at_one():
    chuck, adamw = pair(trend_window=4, damp_down=0.5, damp_up=2.0, damp_min=0.1)
    losses = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]          # rising
    losses += [1.5, 1.3, 1.1, 0.9, 0.7, 0.5, 0.3, 0.1]         # falling
    damps = []
    for g, loss in zip(grad_seq(len(losses)), losses):
        step_both(chuck, adamw, g, loss)
        damps.append(chuck.damp)
        assert chuck.last_lr == LR * chuck.damp
    # no verdict before 4 losses; then halving to the 0.1 floor; the window [1.5 1.6 1.7 1.5]
    # still rises; then calm falling windows (one sign change in 2) double it, capped at 1
    assert damps == [1.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.1, 0.1,
                     0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert np.array_equal(chuck.params.flat, adamw.params.flat)  # damp only scales the lr


def test_damping_on_oscillation_and_flat_loss():
    chuck, _ = pair(trend_window=4, damp_down=0.5, trend_osc=0.5)
    for g, loss in zip(grad_seq(6), [3.0, 1.0, 2.0, 0.5, 1.5, 0.2]):  # falling but zigzag
        chuck.params.grad[:] = g
        chuck.step(loss=loss)
    assert chuck.damp == 0.5 ** 3
    # a rise, then a flat calm loss: damped while the window still rises, then recovers
    flat, _ = pair(trend_window=4, damp_down=0.5, damp_up=2.0)
    damps = []
    for g, loss in zip(grad_seq(10), [1.0, 1.1, 1.2, 1.3] + [1.3] * 6):
        flat.params.grad[:] = g
        flat.step(loss=loss)
        damps.append(flat.damp)
    assert damps == [1.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.25, 0.5, 1.0, 1.0]


def test_mechanisms_watch_the_smoothed_loss():
    chuck, _ = pair(noise_patience=5, loss_beta=0.5)
    for g, loss in zip(grad_seq(3), [4.0, 2.0, 3.0]):
        chuck.params.grad[:] = g
        chuck.step(loss=loss)
        # bias-corrected EMA: 4, (0.5*2 + 0.25*4)/0.75, (0.5*3 + 0.25*2 + 0.125*4)/0.875
    assert chuck.stats()["smoothed_loss"] == pytest.approx(2.5 / 0.875)
    assert chuck.best_loss == pytest.approx(2.0 / 0.75) and chuck.since_best == 1


# ---------------------------------------------------------------- (b) grad-norm scaling

def test_tensor_with_unusually_large_grad_takes_a_smaller_step():
    chuck, adamw = pair(gnorm_ratio=2.0, gnorm_beta=0.5)
    g1, g2 = grad_seq(2)
    g2[W] *= 20.0  # a spike in "w" only
    step_both(chuck, adamw, g1, None)
    assert np.all(chuck.scale == 1.0)
    avg = np.array([np.linalg.norm(g1[s]) for s in (W, B, E)])
    assert np.allclose(chuck.gnorm_avg, avg, rtol=1e-13)
    before_c, before_a = chuck.params.flat.copy(), adamw.params.flat.copy()
    step_both(chuck, adamw, g2, None)
    n2 = np.array([np.linalg.norm(g2[s]) for s in (W, B, E)])
    want = np.where(n2 > 2.0 * avg, 2.0 * avg / n2, 1.0)
    assert want[0] < 0.2 and np.all(want[1:] == 1.0)
    np.testing.assert_allclose(chuck.scale, want, rtol=1e-13)
    np.testing.assert_allclose(chuck.gnorm_avg, 0.5 * avg + 0.5 * n2, rtol=1e-13)
    # Adam's update is linear in the step size: "w" moved want[0] times as far as in AdamW
    np.testing.assert_allclose(chuck.params.flat[W] - before_c[W], want[0] * (adamw.params.flat[W] - before_a[W]),
                               rtol=1e-10, atol=1e-15)
    assert np.array_equal(chuck.params.flat[B.start:], adamw.params.flat[B.start:])


# ---------------------------------------------------------------- (c) stagnation noise

def test_noise_after_n_steps_without_improvement():
    chuck, adamw = pair(noise_patience=3, noise_scale=1.0, seed=5)
    for t, g in enumerate(grad_seq(10)):
        before = adamw.params.flat.copy()
        chuck.params.flat[:] = before  # same start each step: isolates this step's noise
        step_both(chuck, adamw, g, 1.0)  # constant loss: improves once (step 1), then never
        assert np.array_equal(chuck.m, adamw.m) and np.array_equal(chuck.v, adamw.v)
        diff = chuck.params.flat - adamw.params.flat
        if t + 1 in (4, 7, 10):  # since_best = 3, 6, 9
            z = gauss_ref(5, chuck.noise_events - 1, 75)
            for s in (W, B, E):
                sigma = LR * np.linalg.norm(adamw.params.flat[s]) / np.sqrt(s.stop - s.start)
                np.testing.assert_allclose(diff[s], sigma * z[s], rtol=1e-9, atol=1e-16)
        else:
            assert np.all(diff == 0.0)
    assert chuck.noise_events == 3


def test_improvement_resets_the_stagnation_clock():
    chuck, _ = pair(noise_patience=3, improve_tol=0.01)
    # 0.995 is not an improvement over 1.0 with tol 1%; 0.5 is
    for g, loss in zip(grad_seq(6), [1.0, 0.995, 0.5, 0.5, 0.5, 0.5]):
        chuck.params.grad[:] = g
        chuck.step(loss=loss)
    assert chuck.best_loss == 0.5 and chuck.since_best == 3 and chuck.noise_events == 1


# ---------------------------------------------------------------- (d) freezing

def test_tensor_with_tiny_grads_freezes_and_thaws():
    chuck, adamw = pair(freeze_patience=2, freeze_threshold=1e-3)
    gs = grad_seq(8)
    for g in gs[:6]:
        g[B] = 1e-5  # "b" grad RMS below the threshold for steps 1..6
    frozen_b = []
    for t, g in enumerate(gs):
        snapshot = (chuck.params.flat[B].copy(), chuck.m[B].copy(), chuck.v[B].copy())
        step_both(chuck, adamw, g, None, adamw_lr=LR)
        frozen_b.append(chuck.scale[1] == 0.0)
        if frozen_b[-1]:
            assert all(np.array_equal(a, b) for a, b in
                       zip(snapshot, (chuck.params.flat[B], chuck.m[B], chuck.v[B])))
        # the other tensors are unaffected: exactly AdamW
        assert np.array_equal(chuck.params.flat[W], adamw.params.flat[W])
        assert np.array_equal(chuck.params.flat[E], adamw.params.flat[E])
    assert frozen_b == [False, True, True, True, True, True, False, False]
    assert list(chuck.tensor_steps) == [8, 3, 8]  # step 1, then 7 and 8: its own bias corrections
    assert chuck.stats()["frozen"] == 0


# ---------------------------------------------------------------- (e) macro patience

def test_patience_decays_lr_to_floor():
    chuck, adamw = pair(patience=3, lr_decay=0.5, lr_floor=0.2)
    mults = []
    losses = [1.0] * 10 + [0.5] * 2
    for g, loss in zip(grad_seq(len(losses)), losses):
        step_both(chuck, adamw, g, loss)
        mults.append(chuck.lr_mult)
        assert chuck.last_lr == LR * chuck.lr_mult
    # since_best reaches 3, 6, 9 at steps 4, 7, 10; an improvement keeps the decayed lr
    assert mults == [1.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.2] * 3
    assert chuck.since_best == 1
    assert np.array_equal(chuck.params.flat, adamw.params.flat)
