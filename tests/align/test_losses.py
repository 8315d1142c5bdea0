"""DPO / IPO and GRPO: the ops against the formulas written out in NumPy and against float64
finite differences; nt.align.dpo_loss and group_advantages against the same formulas;
bad inputs refused with a message."""
import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import align, ops


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def dpo_reference(pc, pr, rc, rr, beta, eps, loss_type):
    """TRL's DPO losses and rewards written out (IPO on whatever log-probs it is given)."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    return losses, beta * (pc - rc), beta * (pr - rr)


DPO_CASES = [(0.1, 0.0, "sigmoid"), (0.5, 0.0, "sigmoid"), (0.1, 0.2, "sigmoid"), (2.0, 0.5, "sigmoid"),
             (0.1, 0.0, "ipo"), (1.0, 0.0, "ipo")]


def dpo_inputs(seed, B=5):
    rng = np.random.default_rng(seed)
    return rng.normal(-20, 4, 2 * B), rng.normal(-20, 4, 2 * B), rng.integers(1, 9, 2 * B)


@pytest.mark.parametrize("beta,eps,loss_type", DPO_CASES)
def test_dpo_loss_matches_formula(beta, eps, loss_type):
    policy, ref, _ = dpo_inputs(0)
    B = policy.size // 2
    got = align.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta, eps, loss_type)
    want = dpo_reference(policy[:B], policy[B:], ref[:B], ref[B:], beta, eps, loss_type)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


@pytest.mark.parametrize("beta,eps,loss_type", DPO_CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_dpo_op_forward_and_gradient(beta, eps, loss_type, with_lengths):
    policy, ref, lengths = dpo_inputs(1)
    B = policy.size // 2
    lengths = lengths if with_lengths else None
    build = lambda t, p: ops.dpo(t, p["pi"], ref, beta, eps, loss_type, lengths)  # noqa: E731
    _, _, loss = run_op(build, {"pi": policy})
    w = 1.0 / lengths if with_lengths else np.ones(2 * B)
    pc, pr, rc, rr = policy[:B] * w[:B], policy[B:] * w[B:], ref[:B] * w[:B], ref[B:] * w[B:]
    np.testing.assert_allclose(loss.data[0], dpo_reference(pc, pr, rc, rr, beta, eps, loss_type)[0].mean(),
                               rtol=1e-12)
    check_grads(build, {"pi": policy})


def test_dpo_op_float32_and_extreme_margins():
    """float32 storage agrees with float64; margins of +-1000 stay finite (stable log-sigmoid)."""
    policy, ref, _ = dpo_inputs(2)
    want = run_op(lambda t, p: ops.dpo(t, p["pi"], ref, 0.3, 0.1), {"pi": policy})[2].data[0]
    got = run_op(lambda t, p: ops.dpo(t, p["pi"], ref, 0.3, 0.1), {"pi": policy}, np.float32)[2].data[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    far = np.array([1000.0, -1000.0, -1000.0, 1000.0])
    t, p, loss = run_op(lambda t, p: ops.dpo(t, p["pi"], np.zeros(4), 1.0), {"pi": far})
    p.zero_grad()
    t.backward(loss)
    assert np.isfinite(loss.data[0]) and np.all(np.isfinite(p["pi"].grad))
    np.testing.assert_allclose(loss.data[0], 2000.0 / 2, rtol=1e-12)   # pair 0: ~0, pair 1: 2000


def test_dpo_rejects_bad_input():
    pi = np.zeros(4)
    for kwargs, match in [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.7}, "label_smoothing"),
                          ({"loss_type": "hinge"}, "loss_type"), ({"lengths": np.array([1, 0, 1, 1])}, "lengths")]:
        with pytest.raises(ValueError, match=match):
            run_op(lambda t, p: ops.dpo(t, p["pi"], np.zeros(4), **kwargs), {"pi": pi})
    with pytest.raises(ValueError, match="2B values"):
        run_op(lambda t, p: ops.dpo(t, p["pi"], np.zeros(3)), {"pi": np.zeros(3)})
    with pytest.raises(ValueError, match="non-finite value at index"):
        run_op(lambda t, p: ops.dpo(t, p["pi"], np.array([0, np.nan, 0, 0])), {"pi": pi})
    with pytest.raises(ValueError, match="shape"):
        run_op(lambda t, p: ops.dpo(t, p["pi"], np.zeros(6)), {"pi": pi})
    with pytest.raises(ValueError, match="same length"):
        align.dpo_loss(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))


def grpo_reference(lp, old, ref, adv, mask, beta, eps_low, eps_high):
    """GRPO's token-level loss written out: clipped ratio objective, k3 KL, token mean."""
    ratio = np.exp(lp - old)
    clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high)
    surrogate = np.minimum(ratio * adv[:, None], clipped * adv[:, None])
    kl = np.exp(ref - lp) - (ref - lp) - 1
    per_token = -(surrogate - beta * kl)
    return (per_token * mask).sum() / mask.sum()


GRPO_CASES = [(0.0, 0.2, None), (0.04, 0.2, None), (0.5, 0.1, 0.3), (0.1, 0.2, 0.28)]


def grpo_inputs(seed, B=4, T=6):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-2, 1, (B, T))
    old = lp + rng.normal(0, 0.3, (B, T))       # ratios inside and outside [0.8, 1.2]
    ref = lp + rng.normal(0, 0.5, (B, T))
    adv = rng.standard_normal(B)
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    mask[:, 0] = 1
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("beta,eps,eps_high", GRPO_CASES)
def test_grpo_op_forward_and_gradient(beta, eps, eps_high):
    lp, old, ref, adv, mask = grpo_inputs(3)
    build = lambda t, p: ops.grpo(t, p["lp"], old, ref, adv, mask, beta, eps, eps_high)  # noqa: E731
    _, _, loss = run_op(build, {"lp": lp})
    want = grpo_reference(lp, old, ref, adv, mask, beta, eps, eps if eps_high is None else eps_high)
    np.testing.assert_allclose(loss.data[0], want, rtol=1e-12)
    check_grads(build, {"lp": lp})


def test_grpo_gradient_is_zero_where_clipped_and_masked():
    """A token whose ratio is clipped on the side the advantage pushes gets only the KL
    gradient; masked tokens get none."""
    lp = np.zeros((2, 3))
    old = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])    # ratios e and 1/e: outside [0.8, 1.2]
    adv = np.array([1.0, -1.0])
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    t, p, loss = run_op(lambda t, p: ops.grpo(t, p["lp"], old, None, adv, mask, 0.0), {"lp": lp})
    p.zero_grad()
    t.backward(loss)
    g = p["lp"].grad
    assert g[0, 0] == 0 and g[1, 0] == 0 and g[0, 2] == 0
    np.testing.assert_allclose(g[0, 1], -1.0 / 5)   # ratio 1, A = 1, 5 tokens
    np.testing.assert_allclose(g[1, 1], 1.0 / 5)


def test_grpo_at_the_old_policy_is_minus_the_mean_advantage():
    """With lp == old == ref, the loss is -mean over tokens of A (the on-policy case)."""
    lp, _, _, adv, mask = grpo_inputs(4)
    _, _, loss = run_op(lambda t, p: ops.grpo(t, p["lp"], lp, lp, adv, mask, 0.3), {"lp": lp})
    np.testing.assert_allclose(loss.data[0], -(adv[:, None] * mask).sum() / mask.sum(), rtol=1e-12)


def test_grpo_rejects_bad_input():
    lp, old, ref, adv, mask = grpo_inputs(5)
    bad_old = old.copy()
    bad_old[1, 2] = np.inf
    cases = [(dict(old_logps=bad_old), "non-finite value at index \\(1, 2\\)"),
             (dict(advantages=adv[:3]), "advantages must have shape"),
             (dict(ref_logps=None), "ref_logps are needed"),
             (dict(beta=-1.0), "beta"), (dict(epsilon=1.5), "epsilon"),
             (dict(advantages=np.array(["a"] * 4)), "must hold numbers")]
    for change, match in cases:
        kwargs = dict(old_logps=old, ref_logps=ref, advantages=adv, mask=mask, beta=0.1) | change
        with pytest.raises((ValueError, TypeError), match=match):
            run_op(lambda t, p: ops.grpo(t, p["lp"], **kwargs), {"lp": lp})


def test_group_advantages_match_formula():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    got = align.group_advantages(rewards, 4)
    groups = rewards.reshape(2, 4)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-12)
    assert np.all(got[4:] == 0)   # a group of equal rewards teaches nothing


def test_group_advantages_refuse_bad_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        align.group_advantages(np.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of G"):
        align.group_advantages(np.zeros(5), 2)
