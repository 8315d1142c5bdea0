import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def test_dropout_is_identity_in_eval_mode_and_at_p0():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones((4, 5))})
    t = Tape("cpu", np.float64)
    assert ops.dropout(t, p["x"], 0.0) is p["x"]
    t.training = False
    assert ops.dropout(t, p["x"], 0.5) is p["x"]
    assert not t.records


@pytest.mark.parametrize("T", [1, 50])
def test_dropout_drops_about_p_and_rescales(T):
    p_drop = 0.3
    x = np.random.default_rng(0).standard_normal((4, T, 100))
    _, _, out = run_op(lambda t, p: ops.dropout(t, p["x"], p_drop), {"x": x})
    kept = out.data != 0
    np.testing.assert_allclose(out.data[kept], x[kept] / (1 - p_drop), rtol=1e-12)
    if T > 1:
        assert abs(1 - kept.mean() - p_drop) < 0.02


def test_dropout_masks_depend_on_seed_step_and_call_only():
    x = np.ones((8, 64))

    def masks(seed, step):
        _, params, _ = run_op(lambda t, p: p["x"], {"x": x})
        t = Tape("cpu", np.float64)
        t.seed, t.step = seed, step
        return [ops.dropout(t, params["x"], 0.5).data != 0 for _ in range(2)]

    a, b = masks(1, 7), masks(1, 7)
    np.testing.assert_array_equal(a[0], b[0])          # reproducible
    assert (a[0] != a[1]).any()                         # two calls in one forward differ
    assert (masks(1, 8)[0] != a[0]).any()               # a new step draws a new mask
    assert (masks(2, 7)[0] != a[0]).any()               # so does a new seed


def test_dropout_backward_uses_the_same_mask():
    x = np.random.default_rng(1).standard_normal((3, 20))
    check_grads(lambda t, p: ops.dropout(t, p["x"], 0.4), {"x": x})
    t, params, out = run_op(lambda t, p: ops.dropout(t, p["x"], 0.4), {"x": x})
    params.zero_grad()
    t.backward(out, np.ones(out.shape))
    np.testing.assert_array_equal(params["x"].grad != 0, out.data != 0)


def test_dropout_rejects_bad_p():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones(3)})
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="p must be"):
            ops.dropout(Tape("cpu", np.float64), p["x"], bad)
