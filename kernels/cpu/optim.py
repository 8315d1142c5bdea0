"""Optimizer kernels over the whole flat parameter buffer: one launch per step.

Per-tensor work (Chuck's per-tensor scales, step counts, freezing, noise) uses a block
table: block b is `x[block_offsets[b]:block_offsets[b+1]]` and belongs to tensor (segment)
`block_seg[b]`; blocks never straddle two tensors. Every block is one parallel task, so
one launch covers all tensors, balanced, and per-tensor sums have a fixed order.
"""
import math

import numpy as np
from numba import njit, prange

from .vmath import like

BLOCK = 4096  # elements per parallel task in reductions
# Sums of squares may reassociate within a block so LLVM can vectorize them (several
# float64 partial sums per block, in a fixed order: still independent of the thread
# count); inf and NaN keep their meaning, which the NaN guard relies on.
REDUCE_FASTMATH = {"reassoc", "contract"}


@njit(parallel=True, cache=True)
def adam_update(params, grads, m, v, block_offsets, block_seg, block_decay, seg_scale, seg_step,
                lr, beta1, beta2, eps, l2, decay, grad_scale, zero_grads):
    """Adam / AdamW over the blocks of the flat buffer, in place.

    Block b is params[block_offsets[b]:block_offsets[b+1]], inside tensor s = block_seg[b]
    with scale seg_scale[s] (0 = frozen: parameters and moments untouched) and step count
    seg_step[s] (from 1, drives the bias corrections). A block with block_decay[b] 1 gets
    L2-coupled decay `l2` (PyTorch's Adam: added to the gradient before the moments) and
    decoupled decay `decay` (AdamW: added to the update); blocks never straddle a change of
    decay, so one flag per block replaces a byte per parameter. The gradient is read times
    grad_scale[0] (a 1-element float64 array: the clipping factor, which a device can
    compute without a host read-back; llm.c folds it in the same way, no separate pass):
        g = grad_scale*grad + l2*p;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
        p -= lr*scale * ((m/bc1) / (sqrt(v/bc2) + eps) + decay*p)
    With zero_grads the grads are left zero for the next backward, in this same pass (a
    frozen tensor's too). One parallel region for all tensors (a region per tensor was
    2-4x slower on a busy 2-core machine).
    """
    for b in prange(block_seg.shape[0]):
        s = block_seg[b]
        scale = seg_scale[s]
        lo, hi = block_offsets[b], block_offsets[b + 1]
        P, G, M, V = params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi]
        if scale != 0.0:
            # every coefficient in the parameters' float type, so a float32 update runs in
            # float32 SIMD lanes (PyTorch's fused AdamW also computes in the parameter type)
            p0 = P[0]
            b1, b2 = like(p0, beta1), like(p0, beta2)
            c1, c2 = like(p0, 1.0 - beta1), like(p0, 1.0 - beta2)
            inv_bc1 = like(p0, 1.0 / (1.0 - beta1 ** seg_step[s]))
            inv_bc2 = like(p0, 1.0 / (1.0 - beta2 ** seg_step[s]))
            eps_, lr_s, gs = like(p0, eps), like(p0, lr * scale), like(p0, grad_scale[0])
            # the block's decay flag picks its coefficients, so the loop has no branch to
            # vectorize around (0 * p adds nothing to a finite p)
            decays = block_decay[b] != 0
            l2_ = like(p0, l2 if decays else 0.0)
            decay_ = like(p0, decay if decays else 0.0)
            for i in range(hi - lo):
                p = P[i]
                g = gs * G[i] + l2_ * p
                mi = b1 * M[i] + c1 * g
                vi = b2 * V[i] + c2 * g * g
                M[i] = mi
                V[i] = vi
                P[i] = p - lr_s * ((mi * inv_bc1) / (np.sqrt(vi * inv_bc2) + eps_) + decay_ * p)
        if zero_grads:  # while the block's grads are still in cache: the write-back is the cost
            for i in range(hi - lo):
                G[i] = 0.0


@njit(parallel=True, cache=True)
def sgd_update(params, grads, buf, block_offsets, block_decay, lr, momentum, dampening, weight_decay, nesterov,
               first, grad_scale):
    """SGD with momentum (PyTorch's rule), in place, over the blocks of the flat buffer
    (block b is params[block_offsets[b]:block_offsets[b+1]], decay flag block_decay[b]):

        g = grad_scale[0]*grad + wd*p (blocks with decay only)
        b = g on the first step, else momentum*b + (1-dampening)*g   (skipped if momentum 0)
        p -= lr * (g + momentum*b if nesterov else b)
    """
    gs = grad_scale[0]
    for blk in prange(block_decay.shape[0]):
        wd = weight_decay if block_decay[blk] != 0 else 0.0
        for i in range(block_offsets[blk], block_offsets[blk + 1]):
            p = params[i]
            g = gs * grads[i]
            if wd != 0.0:
                g += wd * p
            if momentum != 0.0:
                if first:
                    b = g
                else:
                    b = momentum * buf[i] + (1.0 - dampening) * g
                buf[i] = b
                if nesterov:
                    g = g + momentum * b
                else:
                    g = b
            params[i] = p - lr * g


def sum_squares_blocks(n: int) -> int:
    """Length of the `partials` buffer sum_squares needs for n elements."""
    return max(1, (n + BLOCK - 1) // BLOCK)


@njit(parallel=True, cache=True, fastmath=REDUCE_FASTMATH)
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


def clip_scale_(x, partials, max_norm, out) -> None:
    """out[0] = the factor that clips x's global L2 norm to max_norm (max_norm / (norm +
    1e-6) when the norm is above it, else 1; a non-finite norm also gives 1, see GradScaler),
    out[1] = the norm. out is a float64 array of 2 on x's device, so adam_update and
    sgd_update read the factor where it is made (no host read-back on a GPU); partials as
    for sum_squares."""
    norm = math.sqrt(sum_squares(x, partials))
    out[0] = max_norm / (norm + 1e-6) if math.isfinite(norm) and norm > max_norm > 0 else 1.0
    out[1] = norm


@njit(parallel=True, cache=True, fastmath=REDUCE_FASTMATH)
def segment_sum_squares(x, block_offsets, block_seg, partial, out):
    """out[s] = sum of x**2 over segment s, in float64 (one launch for all tensors).

    Block b covers x[block_offsets[b]:block_offsets[b+1]] inside segment block_seg[b];
    partial (float64, one slot per block) is scratch. Blocks are summed in order.
    """
    nblocks = block_seg.shape[0]
    for b in prange(nblocks):
        s = 0.0
        for i in range(block_offsets[b], block_offsets[b + 1]):
            s += np.float64(x[i]) * np.float64(x[i])
        partial[b] = s
    out[:] = 0.0
    for b in range(nblocks):
        out[block_seg[b]] += partial[b]


@njit(parallel=True, cache=True)
def unscale_check_(x, inv_scale, partials):
    """x *= inv_scale in place; returns how many elements are NaN or +-Inf after scaling.

    Each block counts into its own slot of `partials` (float64, sum_squares_blocks(n)
    long, as for sum_squares): a parfor reduction variable would allocate."""
    n = x.shape[0]
    nblocks = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        c = 0
        for i in range(blk * BLOCK, min((blk + 1) * BLOCK, n)):
            x[i] = x[i] * inv_scale
            if not np.isfinite(x[i]):  # checked as stored (a float32 can overflow)
                c += 1
        partials[blk] = c
    bad = 0
    for blk in range(nblocks):
        bad += int(partials[blk])
    return bad


@njit(parallel=True, cache=True)
def scale_(x, factor):
    """x *= factor, in place."""
    for i in prange(x.shape[0]):
        x[i] *= factor


# ---------------------------------------------------------------------- seeded noise
# A counter-based generator: the normal for element i of noise event `counter` is a pure
# function of (seed, counter, i), so it is the same in any thread order and on any device,
# needs no state but the counter, and a NumPy reference can reproduce it exactly.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True)
def splitmix64(x):
    """SplitMix64's output function of x + golden gamma (uint64 in, uint64 out)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def gauss(key, i):
    """Standard normal number i of the stream `key` (Box-Muller on two hashed uniforms)."""
    j = np.uint64(2) * np.uint64(i)
    u1 = (np.float64(splitmix64(key + j) >> np.uint64(11)) + 0.5) * 2.0 ** -53
    u2 = (np.float64(splitmix64(key + j + np.uint64(1)) >> np.uint64(11)) + 0.5) * 2.0 ** -53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@njit(cache=True)
def noise_key(seed, counter):
    """The stream key of noise event `counter` under `seed` (both non-negative ints)."""
    return splitmix64(splitmix64(np.uint64(seed)) + np.uint64(counter))


@njit(parallel=True, cache=True)
def add_noise_(x, block_offsets, block_seg, seg_sigma, seed, counter):
    """x[i] += seg_sigma[s] * N(0, 1) for every element i of every block of tensor s
    (sigma 0: skipped). The normal for element i is gauss(noise_key(seed, counter), i):
    reproducible from (seed, counter) alone."""
    key = noise_key(seed, counter)
    for b in prange(block_seg.shape[0]):
        sigma = seg_sigma[block_seg[b]]
        if sigma == 0.0:
            continue
        for i in range(block_offsets[b], block_offsets[b + 1]):
            x[i] += sigma * gauss(key, i)
