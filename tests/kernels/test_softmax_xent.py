import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Params, Tape, ops

V, VP = 10, 16  # real vocabulary and padded width


def reference(logits, targets):
    z = logits[..., :V]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    valid = targets >= 0
    picked = np.take_along_axis(z, np.maximum(targets, 0)[..., None], -1)[..., 0]
    return ((lse - picked) * valid).sum() / valid.sum()


TARGETS = np.array([[3, -1, 9], [0, 5, -1]], dtype=np.int32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_forward_matches_numpy(dtype):
    logits = np.random.default_rng(0).standard_normal((2, 3, VP)) * 3
    logits[..., V:] = 100.0  # padding must be ignored however large
    _, _, loss = run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V), {"logits": logits}, dtype)
    np.testing.assert_allclose(loss.data[0], reference(logits, TARGETS), rtol=1e-5)


def test_cross_entropy_backward_finite_differences():
    logits = np.random.default_rng(1).standard_normal((2, 3, VP))
    check_grads(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V), {"logits": logits})


def test_cross_entropy_ignored_positions_and_padding_get_no_grad():
    logits = np.random.default_rng(2).standard_normal((2, 3, VP))
    t, p, loss = run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V), {"logits": logits})
    p.zero_grad()
    t.backward(loss)
    g = p["logits"].grad
    assert np.all(g[0, 1] == 0) and np.all(g[1, 2] == 0) and np.all(g[..., V:] == 0)
    assert np.abs(g[0, 0]).sum() > 0


def test_cross_entropy_rejects_bad_targets():
    logits = np.zeros((2, 3, VP))
    with pytest.raises(ValueError, match="outside"):
        run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS + 1, V), {"logits": logits})
    with pytest.raises(ValueError, match="outside"):
        run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS - 1, V), {"logits": logits})
    with pytest.raises(ValueError, match="do not match"):
        run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS[:, :2], V), {"logits": logits})
    with pytest.raises(ValueError, match="vocab_size"):
        run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, VP + 1), {"logits": logits})


def reference_options(logits, targets, eps, zc):
    """PyTorch's label smoothing and PaLM's z-loss, written out."""
    z = logits[..., :V]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z - lse[..., None]
    valid = targets >= 0
    nll = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    per = (1 - eps) * nll + eps * (-logp.mean(-1)) + zc * lse ** 2
    return (per * valid).sum() / valid.sum()


OPTIONS = [(0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3), (1.0, 0.0)]


@pytest.mark.parametrize("eps,zc", OPTIONS)
def test_cross_entropy_smoothing_and_z_loss_forward(eps, zc):
    logits = np.random.default_rng(3).standard_normal((2, 3, VP)) * 3
    logits[..., V:] = 50.0
    _, _, loss = run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V, eps, zc), {"logits": logits})
    np.testing.assert_allclose(loss.data[0], reference_options(logits, TARGETS, eps, zc), rtol=1e-12)


@pytest.mark.parametrize("eps,zc", OPTIONS)
def test_cross_entropy_smoothing_and_z_loss_backward(eps, zc):
    logits = np.random.default_rng(4).standard_normal((2, 3, VP))
    check_grads(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V, eps, zc), {"logits": logits})


def test_cross_entropy_rejects_bad_options():
    logits = np.zeros((2, 3, VP))
    with pytest.raises(ValueError, match="label_smoothing"):
        run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V, label_smoothing=1.5), {"logits": logits})
    with pytest.raises(ValueError, match="z_loss"):
        run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V, z_loss=-1.0), {"logits": logits})


def test_cross_entropy_single_position():
    logits = np.random.default_rng(5).standard_normal((2, 1, VP))
    targets = np.array([[4], [7]], dtype=np.int32)
    _, _, loss = run_op(lambda t, p: ops.cross_entropy(t, p["logits"], targets, V, 0.1, 1e-3), {"logits": logits})
    np.testing.assert_allclose(loss.data[0], reference_options(logits, targets, 0.1, 1e-3), rtol=1e-12)
    check_grads(lambda t, p: ops.cross_entropy(t, p["logits"], targets, V, 0.1, 1e-3), {"logits": logits})


# ----------------------------------------------------------------------------- log-probabilities, KL

def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("T", [1, 4])
def test_token_and_sequence_logprobs(T):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, T, 11))
    targets = rng.integers(0, 9, (2, T)).astype(np.int64)
    targets[1, 0] = -1                                   # outside the response mask
    ref = np.take_along_axis(log_softmax(logits[..., :9]), np.maximum(targets, 0)[..., None], -1)[..., 0]
    ref[targets < 0] = 0.0
    _, _, lp = run_op(lambda t, p: ops.token_logprobs(t, p["z"], targets, 9), {"z": logits})
    np.testing.assert_allclose(lp.data, ref, rtol=1e-12, atol=1e-12)
    check_grads(lambda t, p: ops.token_logprobs(t, p["z"], targets, 9), {"z": logits})
    _, _, sums = run_op(lambda t, p: ops.sequence_logprobs(t, p["z"], targets, 9)[0], {"z": logits})
    np.testing.assert_allclose(sums.data, ref.sum(1), rtol=1e-12)
    check_grads(lambda t, p: ops.sequence_logprobs(t, p["z"], targets, 9)[0], {"z": logits})
    from nt import Tape
    _, counts = ops.sequence_logprobs(Tape("cpu", np.float64), run_op(lambda t, p: p["z"], {"z": logits})[2],
                                      targets, 9)
    assert counts.tolist() == [T, T - 1]


def test_sum_rows_forward_and_backward():
    x = np.random.default_rng(8).standard_normal((3, 2, 5))
    _, _, out = run_op(lambda t, p: ops.sum_rows(t, p["x"]), {"x": x})
    np.testing.assert_allclose(out.data, x.sum(-1), rtol=1e-12)
    check_grads(lambda t, p: ops.sum_rows(t, p["x"]), {"x": x})


def kl_reference(student, teacher, T, mask):
    pt = np.exp(log_softmax(teacher / T))
    rows = T * T * (pt * (log_softmax(teacher / T) - log_softmax(student / T))).sum(-1)
    return rows[mask].mean()


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_div_matches_numpy_and_finite_differences(T, masked):
    rng = np.random.default_rng(9)
    student, teacher = rng.standard_normal((2, 3, 8)) * 2, rng.standard_normal((2, 3, 10)) * 2
    targets = np.zeros((2, 3), np.int32)
    if masked:
        targets[0, 1] = targets[1, 2] = -1
    mask = targets >= 0

    def build(t, p):
        return ops.kl_div(t, p["s"], p["teach"], T, targets, vocab_size=6)   # teacher is padded wider
    _, _, loss = run_op(build, {"s": student, "teach": teacher})
    assert loss.data[0] == pytest.approx(kl_reference(student[..., :6], teacher[..., :6], T, mask), rel=1e-12)
    from helpers import make_params
    from nt import Tape
    p = make_params({"s": student, "teach": teacher})
    t = Tape("cpu", np.float64)
    out = build(t, p)
    t.backward(out)
    assert not p["teach"].grad.any()                     # the teacher gets no gradient
    check_grads(lambda t, q: ops.kl_div(t, q["s"], p["teach"], T, targets, vocab_size=6), {"s": student})


def test_kl_div_of_identical_logits_is_zero_and_bad_input_is_refused():
    z = np.random.default_rng(10).standard_normal((4, 7))
    _, _, loss = run_op(lambda t, p: ops.kl_div(t, p["a"], p["b"], 3.0), {"a": z, "b": z})
    assert abs(loss.data[0]) < 1e-12
    for kwargs, match in [(dict(temperature=0.0), "temperature"), (dict(vocab_size=9), "vocab_size")]:
        with pytest.raises(ValueError, match=match):
            run_op(lambda t, p: ops.kl_div(t, p["a"], p["b"], **kwargs), {"a": z, "b": z})
    with pytest.raises(ValueError, match="same positions"):
        run_op(lambda t, p: ops.kl_div(t, p["a"], p["b"]), {"a": z, "b": z[:3]})


# ----------------------------------------------------------------------------- fused classifier + loss

C = 6
X = np.random.default_rng(7).standard_normal((2, 3, C))
W = np.random.default_rng(8).standard_normal((VP, C))


def classifier(eps=0.0, zc=0.0, targets=TARGETS):
    return lambda t, p: ops.classifier_xent(t, p["x"], p["w"], targets, V, eps, zc)[1]


@pytest.mark.parametrize("eps, zc", [(0.0, 0.0), (0.1, 1e-2)])
def test_classifier_xent_matches_linear_then_cross_entropy(eps, zc):
    out = {}
    t, p, loss = run_op(lambda t, p: out.setdefault("lp", ops.classifier_xent(t, p["x"], p["w"], TARGETS, V, eps, zc))[1],
                        {"x": X, "w": W})
    logits = X @ W.T
    np.testing.assert_allclose(out["lp"][0].data, logits, rtol=1e-12)
    np.testing.assert_allclose(loss.data[0], reference_options(logits, TARGETS, eps, zc), rtol=1e-12)
    p.zero_grad()
    t.backward(loss)
    fused = p.grad.copy()
    t2, p2, loss2 = run_op(lambda t, p: ops.cross_entropy(t, ops.linear(t, p["x"], p["w"]), TARGETS, V, eps, zc),
                           {"x": X, "w": W})
    p2.zero_grad()
    t2.backward(loss2)
    np.testing.assert_allclose(fused, p2.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("eps, zc", [(0.0, 0.0), (0.1, 1e-2)])
def test_classifier_xent_backward_finite_differences(eps, zc):
    check_grads(classifier(eps, zc), {"x": X, "w": W})


def test_classifier_xent_logits_take_no_grad_memory():
    t, p, loss = run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], TARGETS, V)[1], {"x": X, "w": W})
    p.zero_grad()
    t.backward(loss)
    # the only activation grads are the loss's (1,) and x's: no (N, Vp) logits grad was planned
    assert t.acts.gbuf.size < X.size + 2 * 16
    ignored = np.zeros_like(TARGETS) - 1   # nothing counted: zero loss, zero grads
    t, p, loss = run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], ignored, V)[1], {"x": X, "w": W})
    p.zero_grad()
    t.backward(loss)
    assert loss.data[0] == 0 and not np.any(p.grad)


def test_classifier_xent_refuses_bad_input_and_differentiating_its_logits():
    with pytest.raises(ValueError, match="features"):
        run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], TARGETS, V), {"x": X[..., :4], "w": W})
    with pytest.raises(ValueError, match="outside"):
        run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], TARGETS + 1, V), {"x": X, "w": W})
    with pytest.raises(ValueError, match="do not match"):
        run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], TARGETS[:, :2], V), {"x": X, "w": W})
    with pytest.raises(ValueError, match="vocab_size"):
        run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], TARGETS, VP + 1), {"x": X, "w": W})
    with pytest.raises(ValueError, match="label_smoothing"):
        run_op(lambda t, p: ops.classifier_xent(t, p["x"], p["w"], TARGETS, V, 1.5), {"x": X, "w": W})
    with pytest.raises(ValueError, match="no gradient"):
        run_op(lambda t, p: ops.cross_entropy(t, ops.classifier_xent(t, p["x"], p["w"], TARGETS, V)[0], TARGETS, V),
               {"x": X, "w": W})


# ----------------------------------------------------------------------------- chunked (frozen classifier)

N_ROWS = 4 * 5   # several chunks of CHUNK rows, the last one partial
CHUNK = 6
XC = np.random.default_rng(9).standard_normal((4, 5, C))
TC = np.random.default_rng(10).integers(-1, V, (4, 5)).astype(np.int32)


def frozen_classifier(x, targets, eps=0.0, zc=0.0, dloss=1.0, training=True, recording=True):
    """(logits or None, loss, x's grad) of classifier_xent with W frozen (float64)."""
    params = Params("cpu", np.float64, [("x", x.shape, False), ("w", W.shape, False)])
    params["x"].data[...] = x
    params["w"].data[...] = W
    params = params.with_trainable(["x"])
    assert params["w"].grad is None
    t = Tape("cpu", np.float64)
    t.training = training
    t.reset(recording)
    logits, loss = ops.classifier_xent(t, params["x"], params["w"], targets, V, eps, zc)
    logits = None if logits is None else logits.data.copy()   # the backward overwrites them
    grad = None
    if recording:
        params.zero_grad()
        t.backward(loss, np.array([dloss]))
        grad = params["x"].grad.copy()
    return logits, loss.data[0], grad


@pytest.mark.parametrize("eps, zc", [(0.0, 0.0), (0.1, 1e-2)])
def test_frozen_classifier_is_chunked_and_matches_the_full_path(monkeypatch, eps, zc):
    monkeypatch.setattr(ops, "XENT_CHUNK_ROWS", CHUNK)
    logits, loss, grad = frozen_classifier(XC, TC, eps, zc, dloss=0.7)
    assert logits is None                                           # training + recording: never formed
    t2, p2, loss2 = run_op(lambda t, p: ops.cross_entropy(t, ops.linear(t, p["x"], p["w"]), TC, V, eps, zc),
                           {"x": XC, "w": W})
    p2.zero_grad()
    t2.backward(loss2, np.array([0.7]))
    np.testing.assert_allclose(loss, loss2.data[0], rtol=1e-13)
    np.testing.assert_allclose(grad, p2["x"].grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss, reference_options(XC @ W.T, TC, eps, zc), rtol=1e-12)


def test_frozen_classifier_grad_matches_finite_differences(monkeypatch):
    monkeypatch.setattr(ops, "XENT_CHUNK_ROWS", CHUNK)
    _, _, grad = frozen_classifier(XC, TC, 0.1, 1e-2)
    x = XC.copy()
    for i in np.random.default_rng(11).choice(x.size, 40, replace=False):
        old = x.flat[i]
        x.flat[i] = old + 1e-6
        plus = frozen_classifier(x, TC, 0.1, 1e-2, recording=False)[1]
        x.flat[i] = old - 1e-6
        minus = frozen_classifier(x, TC, 0.1, 1e-2, recording=False)[1]
        x.flat[i] = old
        np.testing.assert_allclose(grad.flat[i], (plus - minus) / 2e-6, rtol=1e-6, atol=1e-9)


def test_frozen_classifier_keeps_logits_outside_training_and_counts_nothing_ignored(monkeypatch):
    monkeypatch.setattr(ops, "XENT_CHUNK_ROWS", CHUNK)
    logits, loss, _ = frozen_classifier(XC, TC, training=False)     # eval mode: the logits as before
    np.testing.assert_allclose(logits, XC @ W.T, rtol=1e-12)
    assert frozen_classifier(XC, TC, recording=False)[0] is not None  # inference: as before
    np.testing.assert_allclose(frozen_classifier(XC, TC)[1], loss, rtol=1e-13)
    _, loss, grad = frozen_classifier(XC, np.full_like(TC, -1))
    assert loss == 0 and not np.any(grad)


def test_frozen_classifier_holds_no_logits(monkeypatch):
    """Only CHUNK rows of logits exist at a time (the tape's scratch); the saved arena holds
    x's (N, C) gradient and the per-row losses, not (N, Vp)."""
    monkeypatch.setattr(ops, "XENT_CHUNK_ROWS", CHUNK)
    params = Params("cpu", np.float64, [("x", XC.shape, False), ("w", W.shape, False)]).with_trainable(["x"])
    t = Tape("cpu", np.float64)
    ops.classifier_xent(t, params["x"], params["w"], TC, V)
    assert t.saved.top <= N_ROWS * C + 2 * 64   # dx and the losses, each rounded up to the alignment
    assert t._work.shape[0] == CHUNK * VP


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_rows_far_apart_and_non_finite(dtype):
    """The log-sum-exp shifts by each row's first logit and falls back to its max when the
    sum overflows: rows where the first logit is the max, far below it (float32 overflow
    without the fallback), or NaN / +inf give what a max-shifted reference gives."""
    logits = np.random.default_rng(5).standard_normal((2, 3, VP)) * 3
    logits[0, 0, 0] = 40.0      # the max
    logits[0, 2, 0] = -150.0    # exp(z - z0) would overflow
    logits[1, 0, 4] = 500.0     # ditto, and the target's row
    logits[1, 1, 0] = -1e30
    _, _, loss = run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V), {"logits": logits}, dtype)
    np.testing.assert_allclose(loss.data[0], reference(logits, TARGETS), rtol=1e-5)
    for bad in (np.nan, np.inf):
        logits[0, 0, 2] = bad
        _, _, loss = run_op(lambda t, p: ops.cross_entropy(t, p["logits"], TARGETS, V), {"logits": logits}, dtype)
        assert np.isnan(loss.data[0])


@pytest.mark.parametrize("V", [5, 13, 67])
def test_xent_rows_grad_matches_numpy(V):
    """The chunked classifier's row kernel (max pass, exps kept in the row, grad by scaling
    them) against NumPy's log-softmax, with padding, an ignored row, label smoothing, z-loss
    and a row whose logits spread over 150 (far beyond exp's float32 range)."""
    from nt.kernels import cpu

    rng = np.random.default_rng(21)
    N, Vp, eps, zc, scale = 4, V + 3, 0.1, 1e-3, 0.25
    z = rng.standard_normal((N, Vp)) * 3
    z[1, V - 1], z[1, 0] = 120.0, -30.0
    tg = np.array([2, V - 1, -1, 0], np.int32)
    L = np.log(np.exp(z[:, :V] - z[:, :V].max(1, keepdims=True)).sum(1)) + z[:, :V].max(1)
    p = np.exp(z[:, :V] - L[:, None])
    loss = np.zeros(N)
    grad = np.zeros((N, Vp))
    for n in np.flatnonzero(tg >= 0):
        loss[n] = (1 - eps) * (L[n] - z[n, tg[n]]) + eps * (L[n] - z[n, :V].mean()) + zc * L[n] ** 2
        grad[n, :V] = scale * (p[n] * (1 + 2 * zc * L[n]) - eps / V)
        grad[n, tg[n]] -= scale * (1 - eps)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        rows, losses = z.astype(dtype), np.full(N, 7.0, dtype)
        cpu.xent_rows_grad_(rows, losses, tg, V, scale, eps, zc)
        np.testing.assert_allclose(losses, loss, rtol=tol, atol=tol)
        np.testing.assert_allclose(rows, grad, rtol=tol, atol=tol)
