"""Hebbian and Oja updates against their formulas in NumPy, their known fixed points, and
bad inputs refused."""
import numpy as np
import pytest

from helpers import make_params
from nt import Tape, ops
from nt.hebbian import HebbianLinear, update


def reference(W, x, y, lr, rule, decay):
    """The batch-mean rule, row by row, as the module docstring states it."""
    N = x.shape[0]
    hebb = y.T @ x / N
    c = (y ** 2).mean(axis=0)[:, None] if rule == "oja" else decay
    return W + lr * (hebb - c * W)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", ["hebb", "oja"])
@pytest.mark.parametrize("N", [5, 1])
def test_update_matches_numpy(dtype, rule, N):
    rng = np.random.default_rng(0)
    W, x, y = rng.standard_normal((4, 6)), rng.standard_normal((N, 6)), rng.standard_normal((N, 4))
    got = W.astype(dtype)
    update(got, x.astype(dtype), y.astype(dtype), 0.05, rule, decay=0.3)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(got, reference(W, x, y, 0.05, rule, 0.3), **tol)


def test_update_on_tensors_after_a_forward():
    """Inference-time use: a linear's forward on a tape, then the update from the very
    tensors it read and wrote (leading axes flattened)."""
    rng = np.random.default_rng(1)
    p = make_params({"w": rng.standard_normal((3, 4)), "x": rng.standard_normal((2, 5, 4))})
    before = p["w"].data.copy()
    t = Tape("cpu", np.float64)
    t.reset(recording=False)
    y = ops.linear(t, p["x"], p["w"])
    update(p["w"], p["x"], y, 0.1, "oja")
    np.testing.assert_allclose(p["w"].data, reference(before, p["x"].data.reshape(10, 4),
                                                      y.data.reshape(10, 3), 0.1, "oja", 0.0), rtol=1e-13)


def test_oja_finds_the_principal_component_with_unit_norm():
    """Unsupervised Oja (y = w . x): the row's norm goes to 1 and its direction to the
    inputs' top principal direction."""
    rng = np.random.default_rng(2)
    direction = np.array([3.0, 1.0, -2.0, 0.5]) / np.linalg.norm([3.0, 1.0, -2.0, 0.5])
    layer = HebbianLinear(4, 1, rule="oja", lr=0.05, dtype=np.float64, init_std=0.1, seed=3)
    for _ in range(300):
        x = rng.standard_normal((16, 1)) * 2.0 * direction + rng.standard_normal((16, 4)) * 0.3
        layer.learn(x)
    w = layer.weight.data[0]
    assert abs(np.linalg.norm(w) - 1.0) < 0.05
    assert abs(w @ direction) > 0.99


def test_oja_with_clamped_targets_learns_class_prototypes():
    """Supervised Oja: y clamped to one-hot targets, lr = 1: each class's row becomes the
    mean of its inputs in one step, and the rows of classes absent from the batch stay
    exactly as they were (their y is 0, so is their decay): a new class is learned
    without forgetting the others."""
    rng = np.random.default_rng(4)
    layer = HebbianLinear(3, 3, rule="oja", lr=1.0, dtype=np.float64, init_std=1.0)
    untouched = layer.weight.data[2].copy()
    for cls in (0, 1):
        x = rng.standard_normal((6, 3)) + 5 * cls
        layer.learn(x, np.eye(3)[[cls] * 6])
        np.testing.assert_allclose(layer.weight.data[cls], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(layer.weight.data[2], untouched)


def test_hebb_with_clamped_targets_decays_every_row():
    """Plain Hebb's decay acts on every row, clamped or not: the absent classes' rows
    shrink by (1 - lr * decay) each step, the clamped class's row moves to its mean / decay."""
    rng = np.random.default_rng(5)
    layer = HebbianLinear(3, 2, rule="hebb", lr=0.25, decay=2.0, dtype=np.float64, init_std=1.0)
    before = layer.weight.data.copy()
    x = rng.standard_normal((4, 3))
    layer.learn(x, np.eye(2)[[0] * 4])
    np.testing.assert_allclose(layer.weight.data[1], 0.5 * before[1], rtol=1e-13)
    np.testing.assert_allclose(layer.weight.data[0], 0.5 * before[0] + 0.25 * x.mean(axis=0), rtol=1e-13)


def test_layer_call_and_forward_agree():
    layer = HebbianLinear(4, 2, init_std=1.0, dtype=np.float64)
    x = np.random.default_rng(5).standard_normal((3, 4))
    np.testing.assert_allclose(layer(x), x @ layer.weight.data.T, rtol=1e-13)
    assert layer.params.size == 0 and layer.params.grad.size == 0  # frozen for optimizers and backward


def test_bad_input_refused():
    W = np.zeros((3, 4))
    with pytest.raises(ValueError, match="rule"):
        update(W, np.ones((2, 4)), np.ones((2, 3)), 0.1, "anti")
    with pytest.raises(ValueError, match="lr"):
        update(W, np.ones((2, 4)), np.ones((2, 3)), -0.1)
    with pytest.raises(ValueError, match="decay"):
        update(W, np.ones((2, 4)), np.ones((2, 3)), 0.1, "hebb", float("nan"))
    with pytest.raises(ValueError, match="same leading shape"):
        update(W, np.ones((2, 4)), np.ones((3, 3)), 0.1)
    with pytest.raises(ValueError, match="same leading shape"):
        update(W, np.ones((2, 5)), np.ones((2, 3)), 0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        update(W, np.ones((2, 4), np.float32), np.ones((2, 3)), 0.1)
    with pytest.raises(TypeError, match="Tensor or an array"):
        update(W, [[1.0] * 4], np.ones((1, 3)), 0.1)
    with pytest.raises(ValueError, match="rule"):
        HebbianLinear(4, 3, rule="bcm")
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        HebbianLinear(4, 3).learn(np.ones((2, 5)))
