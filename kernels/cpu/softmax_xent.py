"""Fused softmax + cross-entropy over a padded vocabulary.

logits are (N, Vp) with Vp >= V; columns V..Vp-1 are padding and take no part. A target
of -1 marks a position that contributes nothing (the ignore index). The loss is the mean
over the positions that count; the probabilities are never stored: the backward
recomputes them from the saved log-sum-exp.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def softmax_xent_forward(loss, losses, lse, logits, targets, V):
    """loss (1,) = mean of losses (N,) over targets >= 0; lse (N,) saved for the backward."""
    N = logits.shape[0]
    for n in prange(N):
        row = logits[n]
        m = -np.inf
        for v in range(V):
            m = max(m, row[v])
        s = 0.0
        for v in range(V):
            s += np.exp(row[v] - m)
        lse[n] = m + np.log(s)
        tgt = targets[n]
        losses[n] = lse[n] - row[tgt] if tgt >= 0 else 0.0
    total = 0.0
    count = 0
    for n in range(N):
        if targets[n] >= 0:
            total += losses[n]
            count += 1
    loss[0] = total / count if count > 0 else 0.0


@njit(parallel=True, cache=True)
def softmax_xent_backward(dlogits, dloss, logits, lse, targets, V):
    """Accumulate dlogits += dloss / count * (softmax(logits) - onehot(target))."""
    N = logits.shape[0]
    count = 0
    for n in range(N):
        if targets[n] >= 0:
            count += 1
    if count == 0:
        return
    scale = dloss[0] / count
    for n in prange(N):
        tgt = targets[n]
        if tgt < 0:
            continue
        row = logits[n]
        drow = dlogits[n]
        L = lse[n]
        for v in range(V):
            drow[v] += scale * np.exp(row[v] - L)
        drow[tgt] -= scale
