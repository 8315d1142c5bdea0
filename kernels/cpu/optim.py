"""Optimizer kernels over the whole flat parameter buffer: one launch per step."""
import numpy as np
from numba import njit, prange

BLOCK = 4096  # elements per parallel task in reductions


@njit(parallel=True, cache=True)
def adamw_update(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW (decoupled weight decay), PyTorch's and llm.c's rule, in place.

    decay_mask[i] is 1 where weight decay applies (matrices), 0 where not (biases, norms).
    step counts from 1 and drives the bias corrections.
    """
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    for i in prange(params.shape[0]):
        g = grads[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        p = params[i]
        update = (mi / bc1) / (np.sqrt(vi / bc2) + eps)
        if decay_mask[i]:
            update += weight_decay * p
        params[i] = p - lr * update


def sum_squares_blocks(n: int) -> int:
    """Length of the `partials` buffer sum_squares needs for n elements."""
    return max(1, (n + BLOCK - 1) // BLOCK)


@njit(parallel=True, cache=True)
def sum_squares(x, partials):
    """sum(x**2) in float64. Each block of BLOCK elements sums into its own slot of the
    caller's `partials` (float64, sum_squares_blocks(n) long), then the slots add up in
    order: no allocation, and the same result whatever the thread count."""
    n = x.shape[0]
    nblocks = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        s = 0.0
        for i in range(blk * BLOCK, min((blk + 1) * BLOCK, n)):
            s += np.float64(x[i]) * np.float64(x[i])
        partials[blk] = s
    total = 0.0
    for blk in range(nblocks):
        total += partials[blk]
    return total


@njit(parallel=True, cache=True)
def scale_(x, factor):
    """x *= factor, in place."""
    for i in prange(x.shape[0]):
        x[i] *= factor
