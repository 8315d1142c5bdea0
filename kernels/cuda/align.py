"""DPO (and IPO) and GRPO losses on the GPU: twins of nt.kernels.cpu.align (formulas there).

DPO's B pairs fit one block: each thread takes pairs, one block reduction gives the mean.
GRPO: one block per completion sums its tokens, then one block adds the rows in a fixed
order; the backward is elementwise over (B, T), every block recounting the mask (B*T
numbers, cheap next to the logits). Arithmetic in float64, as on the CPU.
"""
import math

import numpy as np
from numba import cuda, float64

from .activations import _sigmoid
from .launch import THREADS, block_sum, blocks, shared_bytes

SIGMOID, IPO = 0, 1


_F64_SHARED = shared_bytes(np.dtype(np.float64))  # block_sum buffers: float64, as the CPU's math here


@cuda.jit(device=True, cache=True)
def _log_sigmoid(x):
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


@cuda.jit(device=True, cache=True)
def _dpo_margin(policy, ref, weight, i, B):
    j = i + B
    chosen = float(weight[i]) * (float(policy[i]) - float(ref[i]))
    rejected = float(weight[j]) * (float(policy[j]) - float(ref[j]))
    return chosen - rejected


@cuda.jit(cache=True)
def _dpo_forward(loss, losses, policy, ref, weight, beta, label_smoothing, kind):
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    B = losses.shape[0]
    s = 0.0
    for i in range(cuda.threadIdx.x, B, cuda.blockDim.x):
        h = _dpo_margin(policy, ref, weight, i, B)
        if kind == IPO:
            d = h - 1.0 / (2.0 * beta)
            li = d * d
        else:
            li = -(1.0 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
        losses[i] = li
        s += li
    total = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        loss[0] = total / B


@cuda.jit(cache=True)
def _dpo_backward(dpolicy, dloss, policy, ref, weight, beta, label_smoothing, kind):
    B = policy.shape[0] // 2
    g = dloss[0] / B
    for i in range(cuda.grid(1), B, cuda.gridsize(1)):
        h = _dpo_margin(policy, ref, weight, i, B)
        if kind == IPO:
            dh = 2.0 * (h - 1.0 / (2.0 * beta))
        else:
            dh = -(1.0 - label_smoothing) * beta * _sigmoid(-beta * h) + label_smoothing * beta * _sigmoid(beta * h)
        dpolicy[i] += g * weight[i] * dh
        dpolicy[i + B] -= g * weight[i + B] * dh


@cuda.jit(device=True, cache=True)
def _grpo_loss(lp, old, ref, adv, beta, eps_low, eps_high):
    ratio = math.exp(float(lp) - float(old))
    clipped = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
    delta = float(ref) - float(lp)
    kl = math.exp(delta) - delta - 1.0
    return -(min(ratio * float(adv), clipped * float(adv)) - beta * kl)


@cuda.jit(device=True, cache=True)
def _grpo_grad(lp, old, ref, adv, beta, eps_low, eps_high):
    ratio = math.exp(float(lp) - float(old))
    a = float(adv)
    # the min picks the unclipped term (gradient ratio * A) inside the range, or outside it
    # when that term is the smaller; otherwise the clipped term, constant in lp
    inside = 1.0 - eps_low <= ratio <= 1.0 + eps_high
    clipped = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
    d_surrogate = ratio * a if inside or ratio * a < clipped * a else 0.0
    return -d_surrogate + beta * (1.0 - math.exp(float(ref) - float(lp)))


@cuda.jit(device=True, cache=True)
def _mask_count(buf, mask):
    """sum(mask), reduced over the block (every thread of the block must call it)."""
    B, T = mask.shape
    n = 0.0
    for i in range(cuda.threadIdx.x, B * T, cuda.blockDim.x):
        n += mask[i // T, i % T]
    return block_sum(buf, n)


@cuda.jit(cache=True)
def _grpo_rows(rows, lp, old, ref, adv, mask, beta, eps_low, eps_high):
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    B, T = lp.shape
    for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):
        s = 0.0
        for t in range(cuda.threadIdx.x, T, cuda.blockDim.x):
            if mask[b, t] != 0:
                s += mask[b, t] * _grpo_loss(lp[b, t], old[b, t], ref[b, t], adv[b], beta, eps_low, eps_high)
        s = block_sum(buf, s)
        if cuda.threadIdx.x == 0:
            rows[b] = s


@cuda.jit(cache=True)
def _grpo_mean(loss, rows, mask):
    """loss[0] = sum(rows) / sum(mask); a single block, fixed order."""
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    s = 0.0
    for b in range(cuda.threadIdx.x, rows.shape[0], cuda.blockDim.x):
        s += rows[b]
    total = block_sum(buf, s)
    count = _mask_count(buf, mask)
    if cuda.threadIdx.x == 0:
        loss[0] = total / count if count > 0 else 0.0


@cuda.jit(cache=True)
def _grpo_backward(dlp, dloss, lp, old, ref, adv, mask, beta, eps_low, eps_high):
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    count = _mask_count(buf, mask)
    if count == 0:
        return
    g = dloss[0] / count
    B, T = lp.shape
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for i in range(start, B * T, cuda.gridDim.x * cuda.blockDim.x):
        b, t = i // T, i % T
        if mask[b, t] != 0:
            dlp[b, t] += g * mask[b, t] * _grpo_grad(lp[b, t], old[b, t], ref[b, t], adv[b], beta, eps_low, eps_high)


def dpo_forward(loss, losses, policy, ref, weight, beta, label_smoothing, kind):
    """loss (1,) = mean over the B pairs of losses (B,) (see nt.kernels.cpu.align)."""
    _dpo_forward[1, THREADS, 0, _F64_SHARED](loss, losses, policy, ref, weight, beta, label_smoothing, kind)


def dpo_backward(dpolicy, dloss, policy, ref, weight, beta, label_smoothing, kind):
    """Accumulate the DPO / IPO gradient into dpolicy (2B,)."""
    _dpo_backward[blocks(policy.shape[0] // 2), THREADS](dpolicy, dloss, policy, ref, weight, beta,
                                                          label_smoothing, kind)


def grpo_forward(loss, rows, lp, old, ref, adv, mask, beta, eps_low, eps_high):
    """loss (1,) = masked token mean of the clipped-ratio loss with the k3 KL; rows (B,) the per-row sums."""
    _grpo_rows[blocks(lp.shape[0], 1), THREADS, 0, _F64_SHARED](rows, lp, old, ref, adv, mask, beta, eps_low, eps_high)
    _grpo_mean[1, THREADS, 0, _F64_SHARED](loss, rows, mask)


def grpo_backward(dlp, dloss, lp, old, ref, adv, mask, beta, eps_low, eps_high):
    """Accumulate dlp += dloss * mask / count * d l / d lp."""
    _grpo_backward[blocks(lp.size), THREADS, 0, _F64_SHARED](dlp, dloss, lp, old, ref, adv, mask, beta, eps_low,
                                                             eps_high)
