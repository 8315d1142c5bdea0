"""Alignment losses on per-sequence and per-token log-probabilities: DPO (and IPO) and GRPO.

DPO, over B pairs; `policy`, `ref` and `weight` are (2B,): rows 0..B-1 the chosen
responses, rows B..2B-1 the rejected ones. Each log-probability is multiplied by its
weight first (1 for DPO's summed log-probs, 1/length for IPO's averaged ones), then
    h_i = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid: l_i = -(1 - eps) log sigmoid(beta h_i) - eps log sigmoid(-beta h_i)   (eps: label smoothing)
    ipo:     l_i = (h_i - 1 / (2 beta))^2
and the loss is the mean over pairs.

GRPO, over B completions of T tokens; lp, old, ref, mask (B, T), adv (B,):
    r = exp(lp - old),  kl = exp(ref - lp) - (ref - lp) - 1           (the k3 estimator)
    l = -(min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) - beta kl)
and the loss is sum(mask * l) / sum(mask): every completion token of the batch counts once.

The arrays are tiny next to the logits (a few numbers per sequence or token), so the
arithmetic runs in float64 whatever the storage type, and the means are summed in a fixed
order: the same loss for any thread count.
"""
import math

from numba import njit, prange

from .activations import _sigmoid as sigmoid

SIGMOID, IPO = 0, 1   # DPO loss kinds


@njit(cache=True)
def log_sigmoid(x):
    """log(1 / (1 + exp(-x))) without overflow for large |x|."""
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


@njit(cache=True)
def _dpo_margin(policy, ref, weight, i, B):
    """h_i = (pi_c - ref_c) - (pi_r - ref_r) of pair i, on the weighted log-probs."""
    j = i + B
    chosen = float(weight[i]) * (float(policy[i]) - float(ref[i]))
    rejected = float(weight[j]) * (float(policy[j]) - float(ref[j]))
    return chosen - rejected


@njit(parallel=True, cache=True)
def dpo_forward(loss, losses, policy, ref, weight, beta, label_smoothing, kind):
    """loss (1,) = mean over the B pairs of losses (B,) (see the module docstring)."""
    B = losses.shape[0]
    for i in prange(B):
        h = _dpo_margin(policy, ref, weight, i, B)
        if kind == IPO:
            d = h - 1.0 / (2.0 * beta)
            losses[i] = d * d
        else:
            losses[i] = -(1.0 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
    total = 0.0
    for i in range(B):
        total += losses[i]
    loss[0] = total / B


@njit(parallel=True, cache=True)
def dpo_backward(dpolicy, dloss, policy, ref, weight, beta, label_smoothing, kind):
    """Accumulate dpolicy[c] += g w_c dl/dh and dpolicy[r] -= g w_r dl/dh, g = dloss / B."""
    B = policy.shape[0] // 2
    g = dloss[0] / B
    for i in prange(B):
        h = _dpo_margin(policy, ref, weight, i, B)
        if kind == IPO:
            dh = 2.0 * (h - 1.0 / (2.0 * beta))
        else:   # d/dh of -log sigmoid(x) is -sigmoid(-x) * dx/dh
            dh = -(1.0 - label_smoothing) * beta * sigmoid(-beta * h) + label_smoothing * beta * sigmoid(beta * h)
        dpolicy[i] += g * weight[i] * dh
        dpolicy[i + B] -= g * weight[i + B] * dh


@njit(cache=True)
def _grpo_loss(lp, old, ref, adv, beta, eps_low, eps_high):
    """The loss of one completion token."""
    ratio = math.exp(float(lp) - float(old))
    clipped = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
    delta = float(ref) - float(lp)
    kl = math.exp(delta) - delta - 1.0
    return -(min(ratio * float(adv), clipped * float(adv)) - beta * kl)


@njit(cache=True)
def _grpo_grad(lp, old, ref, adv, beta, eps_low, eps_high):
    """d loss / d lp of one completion token."""
    ratio = math.exp(float(lp) - float(old))
    a = float(adv)
    # the min picks the unclipped term (gradient ratio * A) inside the range, or outside it
    # when that term is the smaller; otherwise the clipped term, constant in lp
    inside = 1.0 - eps_low <= ratio <= 1.0 + eps_high
    clipped = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
    d_surrogate = ratio * a if inside or ratio * a < clipped * a else 0.0
    return -d_surrogate + beta * (1.0 - math.exp(float(ref) - float(lp)))


@njit(cache=True)
def _mask_count(mask):
    n = 0.0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            n += mask[b, t]
    return n


@njit(parallel=True, cache=True)
def grpo_forward(loss, rows, lp, old, ref, adv, mask, beta, eps_low, eps_high):
    """loss (1,) = sum over masked tokens of the clipped-ratio loss with the k3 KL penalty,
    divided by the number of masked tokens; rows (B,) = each completion's sum."""
    B, T = lp.shape
    for b in prange(B):
        s = 0.0
        for t in range(T):
            if mask[b, t] != 0:
                s += mask[b, t] * _grpo_loss(lp[b, t], old[b, t], ref[b, t], adv[b], beta, eps_low, eps_high)
        rows[b] = s
    total = 0.0
    for b in range(B):
        total += rows[b]
    count = _mask_count(mask)
    loss[0] = total / count if count > 0 else 0.0


@njit(parallel=True, cache=True)
def grpo_backward(dlp, dloss, lp, old, ref, adv, mask, beta, eps_low, eps_high):
    """Accumulate dlp[b, t] += dloss * mask / count * d l / d lp."""
    B, T = lp.shape
    count = _mask_count(mask)
    if count == 0:
        return
    g = dloss[0] / count
    for b in prange(B):
        for t in range(T):
            if mask[b, t] != 0:
                dlp[b, t] += g * mask[b, t] * _grpo_grad(lp[b, t], old[b, t], ref[b, t], adv[b], beta, eps_low,
                                                         eps_high)
