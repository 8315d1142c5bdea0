"""Optimizer kernels over the whole flat parameter buffer (see the CPU twin): one launch per step.

Per-tensor work uses the CPU's block table: table block b is
x[block_offsets[b]:block_offsets[b+1]], inside tensor (segment) block_seg[b]; blocks never
straddle tensors. One CUDA block handles one table block at a time (grid-stride over the
table), its threads striding inside it, so per-tensor sums have one writer per partial and
a fixed order (no atomics).
"""
import math

import numpy as np
from numba import cuda, float64

from .launch import THREADS, block_sum, blocks, shared_bytes

# Sums of squares (grad norms over ~10^8 elements) and inf counts accumulate in float64, as on
# the CPU: bandwidth-bound kernels where float64 adds costs nothing and keeps clipping exact.
_F64_SHARED = shared_bytes(np.dtype(np.float64))

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@cuda.jit(cache=True)
def _adam(params, grads, m, v, block_offsets, block_seg, block_decay, seg_scale, seg_step,
          lr, beta1, beta2, eps, l2, decay, grad_scale, zero_grads):
    """As the CPU twin: coefficients once per block in the parameters' dtype (float32 math
    for a float32 model, as PyTorch's fused AdamW), the bias corrections in float64; the
    clipping factor read from device memory (grad_scale[0])."""
    dt = params.dtype.type
    b1, b2, c1, c2 = dt(beta1), dt(beta2), dt(1.0 - beta1), dt(1.0 - beta2)
    eps_, gs = dt(eps), dt(grad_scale[0])
    for b in range(cuda.blockIdx.x, block_seg.shape[0], cuda.gridDim.x):
        s = block_seg[b]
        scale = seg_scale[s]
        lo, hi = block_offsets[b] + cuda.threadIdx.x, block_offsets[b + 1]
        if scale != 0.0:  # 0: a frozen tensor, parameters and moments untouched
            inv_bc1 = dt(1.0 / (1.0 - beta1 ** seg_step[s]))
            inv_bc2 = dt(1.0 / (1.0 - beta2 ** seg_step[s]))
            lr_s = dt(lr * scale)
            decays = block_decay[b] != 0  # the block's flag picks its coefficients, as on the CPU
            l2_ = dt(l2) if decays else dt(0)
            decay_ = dt(decay) if decays else dt(0)
            for i in range(lo, hi, cuda.blockDim.x):
                p = params[i]
                g = gs * grads[i] + l2_ * p
                mi = b1 * m[i] + c1 * g
                vi = b2 * v[i] + c2 * g * g
                m[i] = mi
                v[i] = vi
                params[i] = p - lr_s * ((mi * inv_bc1) / (math.sqrt(vi * inv_bc2) + eps_) + decay_ * p)
        if zero_grads:
            for i in range(lo, hi, cuda.blockDim.x):
                grads[i] = 0.0


def adam_update(params, grads, m, v, block_offsets, block_seg, block_decay, seg_scale, seg_step,
                lr, beta1, beta2, eps, l2, decay, grad_scale, zero_grads):
    """Adam / AdamW over the blocks of the flat buffer, in place (see the CPU twin);
    grad_scale is a 1-element float64 device array."""
    _adam[blocks(block_seg.shape[0], 1), THREADS](params, grads, m, v, block_offsets, block_seg, block_decay,
                                                  seg_scale, seg_step, lr, beta1, beta2, eps, l2, decay,
                                                  grad_scale, zero_grads)


@cuda.jit(cache=True)
def _sgd(params, grads, buf, block_offsets, block_decay, lr, momentum, dampening, weight_decay, nesterov, first,
         grad_scale):
    dt = params.dtype.type
    lr_, mom, damp, gs = dt(lr), dt(momentum), dt(1) - dt(dampening), dt(grad_scale[0])
    for blk in range(cuda.blockIdx.x, block_decay.shape[0], cuda.gridDim.x):
        wd = dt(weight_decay) if block_decay[blk] != 0 else dt(0)
        for i in range(block_offsets[blk] + cuda.threadIdx.x, block_offsets[blk + 1], cuda.blockDim.x):
            p = params[i]
            g = gs * grads[i]
            if wd != dt(0):
                g += wd * p
            if mom != dt(0):
                if first:
                    b = g
                else:
                    b = mom * buf[i] + damp * g
                buf[i] = b
                if nesterov:
                    g = g + mom * b
                else:
                    g = b
            params[i] = p - lr_ * g


def sgd_update(params, grads, buf, block_offsets, block_decay, lr, momentum, dampening, weight_decay, nesterov,
               first, grad_scale):
    """SGD with momentum (PyTorch's rule) over the blocks of the flat buffer, in place;
    grads read times grad_scale[0] (a 1-element float64 device array)."""
    _sgd[blocks(block_decay.shape[0], 1), THREADS](params, grads, buf, block_offsets, block_decay, lr, momentum,
                                                   dampening, weight_decay, nesterov, first, grad_scale)


@cuda.jit(cache=True)
def _block_sum_squares(partial, x, block_offsets):
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    for b in range(cuda.blockIdx.x, partial.shape[0], cuda.gridDim.x):
        s = 0.0
        for i in range(block_offsets[b] + cuda.threadIdx.x, block_offsets[b + 1], cuda.blockDim.x):
            s += np.float64(x[i]) * np.float64(x[i])
        s = block_sum(buf, s)
        if cuda.threadIdx.x == 0:
            partial[b] = s


@cuda.jit(device=True, cache=True)
def _first_block(block_seg, s):
    """The first table block of segment s or later (block_seg ascends: blocks follow the
    tensors in order); binary search."""
    lo = 0
    hi = block_seg.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if block_seg[mid] < s:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(cache=True)
def _segments_from_partials(out, partial, block_seg):
    """out[s] = sum of the partials of segment s: a block per segment, its threads striding
    over the segment's (contiguous) table blocks, then a fixed-order tree. A GPT-2 d12 has
    ~7600 table blocks; one thread walking them all took milliseconds."""
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    for s in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        acc = 0.0
        for b in range(_first_block(block_seg, s) + cuda.threadIdx.x, _first_block(block_seg, s + 1),
                       cuda.blockDim.x):
            acc += partial[b]
        acc = block_sum(buf, acc)
        if cuda.threadIdx.x == 0:
            out[s] = acc


def segment_sum_squares(x, block_offsets, block_seg, partial, out):
    """out[s] = sum of x**2 over segment s, in float64; partial (one slot per block) is scratch."""
    _block_sum_squares[blocks(block_seg.shape[0], 1), THREADS, 0, _F64_SHARED](partial, x, block_offsets)
    _segments_from_partials[blocks(out.shape[0], 1), THREADS, 0, _F64_SHARED](out, partial, block_seg)


@cuda.jit(cache=True)
def _unscale_check(partial, x, inv_scale):
    """x *= inv_scale; partial[block] = how many results are NaN or +-Inf (as stored)."""
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    c = 0.0
    inv = x.dtype.type(inv_scale)
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] = x[i] * inv
        y = x[i]
        if math.isinf(y) or math.isnan(y):
            c += 1.0
    c = block_sum(buf, c)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = c


def unscale_check_(x, inv_scale, partials) -> int:
    """x *= inv_scale in place; returns how many elements are NaN or +-Inf (after scaling).
    Block b counts into partials[b] (a float64 device buffer of sum_squares_blocks(n) from
    the caller, as on the CPU), then one block adds the counts: one scalar comes back."""
    nb = blocks(x.shape[0])
    _unscale_check[nb, THREADS, 0, _F64_SHARED](partials, x, inv_scale)
    _sum_into_first[1, THREADS, 0, _F64_SHARED](partials[:nb])
    partials[:1].copy_to_host(_host)
    return int(_host[0])


@cuda.jit(device=True, cache=True)
def _splitmix64(x):
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@cuda.jit(device=True, cache=True)
def _gauss(key, i):
    """Standard normal number i of the stream `key` (Box-Muller on two hashed uniforms)."""
    j = np.uint64(2) * np.uint64(i)
    u1 = (np.float64(_splitmix64(key + j) >> np.uint64(11)) + 0.5) * 2.0 ** -53
    u2 = (np.float64(_splitmix64(key + j + np.uint64(1)) >> np.uint64(11)) + 0.5) * 2.0 ** -53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _noise_key(seed: int, counter: int) -> np.uint64:
    """The CPU's noise_key(seed, counter) in exact integer arithmetic mod 2^64."""
    def mix(x):
        z = (x + 0x9E3779B97F4A7C15) % 2 ** 64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return z ^ (z >> 31)
    return np.uint64(mix((mix(int(seed) % 2 ** 64) + int(counter)) % 2 ** 64))


@cuda.jit(cache=True)
def _add_noise(x, block_offsets, block_seg, seg_sigma, key):
    for b in range(cuda.blockIdx.x, block_seg.shape[0], cuda.gridDim.x):
        sigma = seg_sigma[block_seg[b]]
        if sigma == 0.0:
            continue
        for i in range(block_offsets[b] + cuda.threadIdx.x, block_offsets[b + 1], cuda.blockDim.x):
            x[i] += sigma * _gauss(key, i)


def add_noise_(x, block_offsets, block_seg, seg_sigma, seed, counter):
    """x[i] += seg_sigma[s] * N(0, 1) for every element of tensor s, the normal for element i
    being gauss(noise_key(seed, counter), i): the same numbers as the CPU."""
    _add_noise[blocks(block_seg.shape[0], 1), THREADS](x, block_offsets, block_seg, seg_sigma,
                                                       _noise_key(seed, counter))


@cuda.jit(cache=True)
def _sum_squares_partial(partial, x):
    """partial[block] = sum of x**2 over this block's grid-stride share, in float64."""
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    s = 0.0
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        s += np.float64(x[i]) * np.float64(x[i])
    s = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = s


@cuda.jit(cache=True)
def _sum_into_first(partial):
    """partial[0] = sum(partial), one block."""
    buf = cuda.shared.array(0, float64)  # THREADS values, sized at launch
    s = 0.0
    for i in range(cuda.threadIdx.x, partial.shape[0], cuda.blockDim.x):
        s += partial[i]
    s = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        partial[0] = s


_host = np.zeros(1, np.float64)  # where sum_squares' result lands on the host


def sum_squares_blocks(n: int) -> int:
    """Length of the `partials` buffer sum_squares needs for n elements: one per block."""
    return blocks(n)


def sum_squares(x, partials) -> float:
    """sum(x**2) in float64. Block b of a fixed grid (sum_squares_blocks(n) blocks) writes
    its partial sum to partials[b] (a float64 device buffer from the caller), then one block
    adds the partials: no allocation, the same order every call."""
    nb = sum_squares_blocks(x.shape[0])
    _sum_squares_partial[nb, THREADS, 0, _F64_SHARED](partials, x)
    _sum_into_first[1, THREADS, 0, _F64_SHARED](partials[:nb])
    partials[:1].copy_to_host(_host)
    return float(_host[0])


@cuda.jit(cache=True)
def _clip_from_sum(out, partial, max_norm):
    """out = [factor, norm] from the sum of squares in partial[0] (one thread): the CPU's rule."""
    if cuda.grid(1) == 0:
        norm = math.sqrt(partial[0])
        out[1] = norm
        out[0] = 1.0
        if not (math.isinf(norm) or math.isnan(norm)) and norm > max_norm and max_norm > 0:
            out[0] = max_norm / (norm + 1e-6)


def clip_scale_(x, partials, max_norm, out) -> None:
    """out[0] = the factor that clips x's global L2 norm to max_norm, out[1] = the norm (see
    the CPU twin), all on the device: nothing is read back, so a step that passes `out` to
    adam_update as its grad_scale stays asynchronous."""
    nb = sum_squares_blocks(x.shape[0])
    _sum_squares_partial[nb, THREADS, 0, _F64_SHARED](partials, x)
    _sum_into_first[1, THREADS, 0, _F64_SHARED](partials[:nb])
    _clip_from_sum[1, 1](out, partials, float(max_norm))


@cuda.jit(cache=True)
def _scale(x, factor):
    f = x.dtype.type(factor)
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] *= f


def scale_(x, factor):
    """x *= factor, in place."""
    _scale[blocks(x.shape[0]), THREADS](x, factor)
