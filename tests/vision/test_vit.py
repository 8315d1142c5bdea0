"""nt.models.ViT: gradients by finite differences, a steady-state step allocates nothing,
training on scikit-learn's digits lowers the loss (CI) and reaches the accuracy bar (slow),
and the Hebbian demo learns a new class (slow)."""
import os
import sys
import time

import numpy as np
import pytest

from helpers import measure_step_allocations
from nt.models import ViT, ViTConfig
from nt.optim import AdamW, clip_factor

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "train")


def tiny(dtype=np.float64, **kw) -> ViT:
    cfg = ViTConfig(**{**dict(image_size=4, patch=2, channels=2, width=8, depth=2, heads=2, classes=3), **kw})
    return ViT(cfg, dtype=dtype, seed=1)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_gradients_match_finite_differences(pool):
    model = tiny(pool=pool)
    rng = np.random.default_rng(0)
    flat = model.params.flat
    flat[:] = rng.standard_normal(flat.size) * 0.3   # away from the init's zeros and ones
    x, y = rng.standard_normal((3, 2, 4, 4)), np.array([0, 2, 1])
    model.forward(x, y)
    model.zero_grad()
    model.backward()
    analytic = model.params.grad.copy()
    idx = rng.choice(flat.size, 150, replace=False)
    numeric = np.empty(idx.size)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + 1e-6
        plus = model(x, y)[1]
        flat[i] = old - 1e-6
        minus = model(x, y)[1]
        flat[i] = old
        numeric[j] = (plus - minus) / 2e-6
    np.testing.assert_allclose(analytic[idx], numeric, rtol=1e-5, atol=1e-8)


def test_vit_forward_shapes_and_predict():
    model = tiny(np.float32)
    x = np.random.default_rng(1).standard_normal((5, 2, 4, 4)).astype(np.float32)
    logits, loss = model(x)
    assert logits.shape == (5, 3) and loss is None
    classes, features = model.predict(x, batch_size=2)
    assert classes.shape == (5,) and features.shape == (5, 8)
    np.testing.assert_array_equal(classes, np.argmax(model(x)[0], 1))
    _, tokens = model.predict(x, tokens=True)
    assert tokens.shape == (5, 5 * 8)
    one, _ = model(x[:1])   # N = 1, and a 1-patch image
    assert one.shape == (1, 3)
    single = ViT(ViTConfig(image_size=2, patch=2, channels=1, width=4, depth=1, heads=1, classes=2), seed=0)
    assert single(np.zeros((1, 1, 2, 2), np.float32), np.array([1]))[1] == pytest.approx(np.log(2), rel=1e-6)


def test_vit_refuses_bad_config_and_input():
    for bad in (dict(image_size=7), dict(width=10, heads=4), dict(depth=0), dict(dropout=1.0), dict(pool="max"),
                dict(classes=2.5)):
        with pytest.raises(ValueError):
            ViTConfig(**{**dict(image_size=8, patch=2), **bad})
    model = tiny()
    with pytest.raises(ValueError, match="images"):
        model(np.zeros((2, 2, 4, 5)))
    with pytest.raises(ValueError, match="images"):
        model(np.zeros((2, 2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        model(np.zeros((2, 2, 4, 4)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels for"):
        model(np.zeros((2, 2, 4, 4)), np.array([0, 1, 2]))
    with pytest.raises(RuntimeError, match="labels"):
        model(np.zeros((2, 2, 4, 4)))
        model.backward()


def test_vit_steady_state_step_allocates_nothing(monkeypatch):
    """After the first steps sized the arenas, a whole step (forward, backward, clipping,
    AdamW) makes no new arrays: no arena regrows and no kernel allocates."""
    model = ViT(ViTConfig(image_size=8, patch=2, channels=1, width=32, depth=2, heads=4, classes=10, dropout=0.1))
    opt = AdamW(model.params, lr=1e-3, weight_decay=0.05)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 64)

    def step():
        model.forward(x, y)
        model.zero_grad()
        model.backward()
        _, clip = clip_factor(model.params, 1.0)
        opt.step(grad_scale=clip)

    step()
    step()
    arenas = (model.tape.acts, model.tape.saved)
    grows = [a.grows for a in arenas]
    buffers = [(a.buf, a.gbuf) for a in arenas]
    array_args, nrt_allocs, peak = measure_step_allocations(monkeypatch, model.tape.k, step)
    assert [a.grows for a in arenas] == grows
    assert all(a.buf is b and a.gbuf is g for a, (b, g) in zip(arenas, buffers))
    assert array_args > 50
    assert nrt_allocs == array_args, "a kernel allocated memory"
    one_activation = 64 * 17 * 32 * 4  # bytes of one (N, T, C) float32 tensor
    assert peak < one_activation // 4, f"a step peaked at {peak} bytes of new Python memory"


def _train_vit():
    sys.path.insert(0, TRAIN)
    try:
        import train_vit
    finally:
        sys.path.remove(TRAIN)
    return train_vit


def test_digits_loss_falls():
    """A few epochs on part of the digits: the loss falls well below chance's log(10)."""
    pytest.importorskip("sklearn")
    tv = _train_vit()
    x_train, y_train, _, _ = tv.load_digits_split()
    cfg = ViTConfig(image_size=8, patch=4, channels=1, width=32, depth=2, heads=2, classes=10, mlp=2)
    model = ViT(cfg, seed=0)
    losses = tv.train(model, x_train[:512], y_train[:512], tv.Normalizer(x_train), epochs=10, batch_size=64,
                      lr=3e-3, weight_decay=0.0, seed=0, padding=0)
    assert losses[0] > 2.0
    assert np.mean(losses[-8:]) < 0.5 * np.log(10), losses[-8:]


@pytest.mark.slow
def test_digits_reach_97_percent_in_two_minutes(tmp_path, capsys):
    pytest.importorskip("sklearn")
    tv = _train_vit()
    start = time.perf_counter()
    accuracy = tv.main(["--misclassified", str(tmp_path / "wrong.png")])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"test accuracy: {accuracy:.4f}"
    assert "confusion matrix (test):" in out
    assert accuracy >= 0.97, accuracy
    assert seconds < 120, seconds


@pytest.mark.slow
def test_hebbian_readout_learns_a_new_digit():
    pytest.importorskip("sklearn")
    _train_vit()
    sys.path.insert(0, TRAIN)
    try:
        import hebbian_vit
    finally:
        sys.path.remove(TRAIN)
    before, after = hebbian_vit.main(["--trials", "5"])
    assert after > before + 0.02


def test_a_vit_checkpoint_loads_back(tmp_path):
    """load_model knows ViT (the model table names it), so a trained classifier can be reloaded."""
    from nt.io import load_model, save_checkpoint
    from nt.models import ViT, ViTConfig
    cfg = ViTConfig(image_size=8, patch=4, channels=1, width=16, depth=1, heads=2, classes=3)
    model = ViT(cfg, seed=3)
    images = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    want = model(images)[0].copy()
    save_checkpoint(tmp_path / "ck", model, step=1)
    np.testing.assert_array_equal(load_model(tmp_path / "ck")(images)[0], want)
