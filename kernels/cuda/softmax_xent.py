"""Fused softmax + cross-entropy over a padded vocabulary (see the CPU twin).

logits (N, Vp), columns V..Vp-1 are padding; target -1 is ignored; the loss is the mean
over the counted positions. One block per row reduces max and sum-exp in shared memory.
"""
import math

import numpy as np
from numba import cuda

from .launch import THREADS, block_max, block_sum, blocks
from .memory import ids_to_device


@cuda.jit(cache=True)
def _xent_rows(losses, lse, logits, targets, V):
    buf = cuda.shared.array(THREADS, np.float64)
    N = logits.shape[0]
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m = -math.inf
        for v in range(tid, V, cuda.blockDim.x):
            m = max(m, logits[n, v])
        m = block_max(buf, m)
        s = 0.0
        for v in range(tid, V, cuda.blockDim.x):
            s += math.exp(logits[n, v] - m)
        s = block_sum(buf, s)
        if tid == 0:
            L = m + math.log(s)
            lse[n] = L
            tgt = targets[n]
            losses[n] = L - logits[n, tgt] if tgt >= 0 else 0.0


@cuda.jit(device=True, cache=True)
def _count_targets(buf, targets):
    """How many targets are not ignored, reduced over the block."""
    count = 0.0
    for n in range(cuda.threadIdx.x, targets.shape[0], cuda.blockDim.x):
        if targets[n] >= 0:
            count += 1.0
    return block_sum(buf, count)


@cuda.jit(cache=True)
def _xent_mean(loss, losses, targets):
    """loss[0] = mean of losses over counted targets; a single block, fixed order."""
    buf = cuda.shared.array(THREADS, np.float64)
    s = 0.0
    for n in range(cuda.threadIdx.x, losses.shape[0], cuda.blockDim.x):
        s += losses[n]  # ignored rows hold 0
    total = block_sum(buf, s)
    count = _count_targets(buf, targets)
    if cuda.threadIdx.x == 0:
        loss[0] = total / count if count > 0 else 0.0


@cuda.jit(cache=True)
def _xent_backward(dlogits, dloss, logits, lse, targets, V):
    buf = cuda.shared.array(THREADS, np.float64)
    N = logits.shape[0]
    count = _count_targets(buf, targets)  # every block recounts: N ints, cheap next to N*V
    if count == 0:
        return
    scale = dloss[0] / count
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        tgt = targets[n]
        if tgt < 0:
            continue
        L = lse[n]
        for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
            g = scale * math.exp(logits[n, v] - L)
            if v == tgt:  # the thread owning the target column subtracts: one writer
                g -= scale
            dlogits[n, v] += g


def softmax_xent_forward(loss, losses, lse, logits, targets, V):
    """loss (1,) = mean of losses (N,) over targets >= 0; lse (N,) saved for the backward."""
    targets = ids_to_device(targets)
    _xent_rows[blocks(logits.shape[0], 1), THREADS](losses, lse, logits, targets, V)
    _xent_mean[1, THREADS](loss, losses, targets)


def softmax_xent_backward(dlogits, dloss, logits, lse, targets, V):
    """Accumulate dlogits += dloss / count * (softmax(logits) - onehot(target))."""
    _xent_backward[blocks(logits.shape[0], 1), THREADS](dlogits, dloss, logits, lse,
                                                        ids_to_device(targets), V)
