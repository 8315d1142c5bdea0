"""Optimizer kernels over the whole flat parameter buffer: one launch per step."""
import math

import numpy as np
from numba import cuda

from .launch import THREADS, block_sum, blocks


@cuda.jit(cache=True)
def _adamw(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        g = grads[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        p = params[i]
        update = (mi / bc1) / (math.sqrt(vi / bc2) + eps)
        if decay_mask[i]:
            update += weight_decay * p
        params[i] = p - lr * update


def adamw_update(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step):
    """AdamW (decoupled weight decay), PyTorch's and llm.c's rule, in place.

    decay_mask[i] is 1 where weight decay applies; step counts from 1.
    """
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    _adamw[blocks(params.shape[0]), THREADS](params, grads, m, v, decay_mask, lr, beta1, beta2,
                                             eps, weight_decay, bc1, bc2)


@cuda.jit(cache=True)
def _sum_squares_partial(partial, x):
    """partial[block] = sum of x**2 over this block's grid-stride share, in float64."""
    buf = cuda.shared.array(THREADS, np.float64)
    s = 0.0
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        s += np.float64(x[i]) * np.float64(x[i])
    s = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = s


@cuda.jit(cache=True)
def _sum_into_first(partial):
    """partial[0] = sum(partial), one block."""
    buf = cuda.shared.array(THREADS, np.float64)
    s = 0.0
    for i in range(cuda.threadIdx.x, partial.shape[0], cuda.blockDim.x):
        s += partial[i]
    s = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        partial[0] = s


_host = np.zeros(1, np.float64)  # where sum_squares' result lands on the host
_partials: dict = {}             # sum_squares' own scratch, per grid size, when the caller has none


def sum_squares_blocks(n: int) -> int:
    """Length of the `partials` buffer sum_squares needs for n elements: one per block."""
    return blocks(n)


def sum_squares(x, partials=None) -> float:
    """sum(x**2) in float64. Block b of a fixed grid (sum_squares_blocks(n) blocks) writes
    its partial sum to partials[b] (a float64 device buffer from the caller, or one made
    once here when None), then one block adds the partials: the same order every call."""
    nb = sum_squares_blocks(x.shape[0])
    if partials is None:
        if _partials.get(nb) is None:
            _partials[nb] = cuda.device_array(nb, np.float64)
        partials = _partials[nb]
    _sum_squares_partial[nb, THREADS](partials, x)
    _sum_into_first[1, THREADS](partials[:nb])
    partials[:1].copy_to_host(_host)
    return float(_host[0])


@cuda.jit(cache=True)
def _scale(x, factor):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] *= factor


def scale_(x, factor):
    """x *= factor, in place."""
    _scale[blocks(x.shape[0]), THREADS](x, factor)
