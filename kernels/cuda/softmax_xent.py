"""Softmax over rows, and fused softmax + cross-entropy over a padded vocabulary (see the
CPU twin for the formulas: label smoothing eps and z-loss included).

logits (N, Vp), columns V..Vp-1 are padding; target -1 is ignored; the loss is the mean
over the counted positions. One block per row reduces max and sum-exp in shared memory.
"""
import math

import numpy as np
from numba import cuda

from .launch import THREADS, block_max, block_sum, blocks
from .memory import ids_to_device


@cuda.jit(cache=True)
def _softmax_forward(out, inp):
    buf = cuda.shared.array(THREADS, np.float64)
    N, C = inp.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m = -math.inf
        for c in range(tid, C, cuda.blockDim.x):
            m = max(m, inp[n, c])
        m = block_max(buf, m)
        s = 0.0
        for c in range(tid, C, cuda.blockDim.x):
            e = math.exp(inp[n, c] - m)
            out[n, c] = e
            s += e
        inv = 1.0 / block_sum(buf, s)
        for c in range(tid, C, cuda.blockDim.x):  # each thread rescales what it wrote
            out[n, c] *= inv


@cuda.jit(cache=True)
def _softmax_backward(dinp, dout, out):
    buf = cuda.shared.array(THREADS, np.float64)
    N, C = out.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        dot = 0.0
        for c in range(tid, C, cuda.blockDim.x):
            dot += dout[n, c] * out[n, c]
        dot = block_sum(buf, dot)
        for c in range(tid, C, cuda.blockDim.x):
            dinp[n, c] += out[n, c] * (dout[n, c] - dot)


@cuda.jit(device=True, cache=True)
def _row_lse(buf, row, V, scale):
    """log sum_v exp(scale * row[v]) over the first V entries, reduced over the block
    (every thread gets it), shifted by the row's max for range."""
    m = -math.inf
    for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
        m = max(m, row[v] * scale)
    m = block_max(buf, m)
    s = 0.0
    for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
        s += math.exp(row[v] * scale - m)
    return m + math.log(block_sum(buf, s))


@cuda.jit(device=True, cache=True)
def _row_xent_stats(buf, row, V, smoothing):
    """(lse, sum of the first V logits: only when label smoothing needs it, else 0) of one
    row, every thread of the block getting both."""
    L = _row_lse(buf, row, V, 1.0)
    zsum = 0.0
    if smoothing != 0.0:
        for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
            zsum += row[v]
        zsum = block_sum(buf, zsum)
    return L, zsum


@cuda.jit(cache=True)
def _xent_rows(losses, lse, logits, targets, V, smoothing, z_loss):
    buf = cuda.shared.array(THREADS, np.float64)
    N = logits.shape[0]
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        L, zsum = _row_xent_stats(buf, logits[n], V, smoothing)
        if tid == 0:
            lse[n] = L
            tgt = targets[n]
            if tgt >= 0:
                losses[n] = ((1.0 - smoothing) * (L - logits[n, tgt]) + smoothing * (L - zsum / V)
                             + z_loss * L * L)
            else:
                losses[n] = 0.0


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
def _xent_backward(dlogits, dloss, logits, lse, targets, V, smoothing, z_loss):
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
        pscale = scale * (1.0 + 2.0 * z_loss * L)
        uniform = scale * smoothing / V
        for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
            g = pscale * math.exp(logits[n, v] - L) - uniform
            if v == tgt:  # the thread owning the target column subtracts: one writer
                g -= scale * (1.0 - smoothing)
            dlogits[n, v] += g


def softmax_forward(out, inp):
    """out (N, C) = softmax of each row of inp."""
    _softmax_forward[blocks(inp.shape[0], 1), THREADS](out, inp)


def softmax_backward(dinp, dout, out):
    """Accumulate dinp += y * (dy - sum(dy * y)) per row, y the softmax output."""
    _softmax_backward[blocks(out.shape[0], 1), THREADS](dinp, dout, out)


def softmax_xent_forward(loss, losses, lse, logits, targets, V, smoothing=0.0, z_loss=0.0):
    """loss (1,) = mean of losses (N,) over targets >= 0; lse (N,) saved for the backward."""
    targets = ids_to_device(targets)
    _xent_rows[blocks(logits.shape[0], 1), THREADS](losses, lse, logits, targets, V, smoothing, z_loss)
    _xent_mean[1, THREADS](loss, losses, targets)


def softmax_xent_backward(dlogits, dloss, logits, lse, targets, V, smoothing=0.0, z_loss=0.0):
    """Accumulate dlogits += dloss / count * (p (1 + 2 z_loss lse) - (1-eps) onehot - eps/V)."""
    _xent_backward[blocks(logits.shape[0], 1), THREADS](dlogits, dloss, logits, lse,
                                                        ids_to_device(targets), V, smoothing, z_loss)


@cuda.jit(cache=True)
def _xent_grad(logits, dloss, lse, targets, V, smoothing, z_loss):
    buf = cuda.shared.array(THREADS, np.float64)
    N, Vp = logits.shape
    count = _count_targets(buf, targets)
    scale = dloss[0] / count if count > 0 else 0.0
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        tgt = targets[n]
        L = lse[n]
        pscale = scale * (1.0 + 2.0 * z_loss * L)
        uniform = scale * smoothing / V
        for v in range(cuda.threadIdx.x, Vp, cuda.blockDim.x):
            g = 0.0   # ignored rows and padded columns
            if tgt >= 0 and v < V:
                g = pscale * math.exp(logits[n, v] - L) - uniform
                if v == tgt:
                    g -= scale * (1.0 - smoothing)
            logits[n, v] = g


@cuda.jit(cache=True)
def _xent_rows_grad(logits, losses, targets, V, scale, smoothing, z_loss):
    buf = cuda.shared.array(THREADS, np.float64)
    N, Vp = logits.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        tgt = targets[n]
        if tgt < 0:
            for v in range(tid, Vp, cuda.blockDim.x):
                logits[n, v] = 0.0
            if tid == 0:
                losses[n] = 0.0
            continue
        z_tgt = logits[n, tgt]   # read before any thread overwrites it (the reductions below sync)
        L, zsum = _row_xent_stats(buf, logits[n], V, smoothing)
        if tid == 0:
            losses[n] = (1.0 - smoothing) * (L - z_tgt) + smoothing * (L - zsum / V) + z_loss * L * L
        pscale = scale * (1.0 + 2.0 * z_loss * L)
        uniform = scale * smoothing / V
        for v in range(tid, Vp, cuda.blockDim.x):   # each thread rewrites only the columns it read
            g = 0.0
            if v < V:
                g = pscale * math.exp(logits[n, v] - L) - uniform
                if v == tgt:
                    g -= scale * (1.0 - smoothing)
            logits[n, v] = g


@cuda.jit(cache=True)
def _logprobs_forward(lp, lse, logits, targets, V):
    buf = cuda.shared.array(THREADS, np.float64)
    N = logits.shape[0]
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        L = _row_lse(buf, logits[n], V, 1.0)
        if tid == 0:
            lse[n] = L
            tgt = targets[n]
            lp[n] = logits[n, tgt] - L if tgt >= 0 else 0.0


@cuda.jit(cache=True)
def _logprobs_backward(dlogits, dlp, logits, lse, targets, V):
    N = logits.shape[0]
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        tgt = targets[n]
        if tgt < 0:
            continue
        g = dlp[n]
        for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
            d = -g * math.exp(logits[n, v] - lse[n])
            if v == tgt:  # the thread owning the target column adds the one-hot: one writer
                d += g
            dlogits[n, v] += d


@cuda.jit(cache=True)
def _kl_rows(rows, lse, logits, teacher, targets, V, temperature):
    buf = cuda.shared.array(THREADS, np.float64)
    N = logits.shape[0]
    tid = cuda.threadIdx.x
    inv_t = 1.0 / temperature
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        if targets[n] < 0:
            if tid == 0:
                rows[n] = 0.0
            continue
        Ls = _row_lse(buf, logits[n], V, inv_t)
        Lt = _row_lse(buf, teacher[n], V, inv_t)
        kl = 0.0
        for v in range(tid, V, cuda.blockDim.x):
            zt = teacher[n, v] * inv_t - Lt
            kl += math.exp(zt) * (zt - (logits[n, v] * inv_t - Ls))
        kl = block_sum(buf, kl)
        if tid == 0:
            lse[n, 0] = Ls
            lse[n, 1] = Lt
            rows[n] = temperature * temperature * kl


@cuda.jit(cache=True)
def _kl_backward(dlogits, dloss, logits, teacher, lse, targets, V, temperature):
    buf = cuda.shared.array(THREADS, np.float64)
    count = _count_targets(buf, targets)
    if count == 0:
        return
    inv_t = 1.0 / temperature
    scale = dloss[0] * temperature / count
    for n in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
        if targets[n] < 0:
            continue
        for v in range(cuda.threadIdx.x, V, cuda.blockDim.x):
            ps = math.exp(logits[n, v] * inv_t - lse[n, 0])
            pt = math.exp(teacher[n, v] * inv_t - lse[n, 1])
            dlogits[n, v] += scale * (ps - pt)


def softmax_xent_grad_(logits, dloss, lse, targets, V, smoothing=0.0, z_loss=0.0):
    """Overwrite logits (N, Vp) with the loss's gradient (0 on ignored rows and padded
    columns): the fused classifier's backward, the gradient in the logits' memory."""
    _xent_grad[blocks(logits.shape[0], 1), THREADS](logits, dloss, lse, ids_to_device(targets), V, smoothing, z_loss)


def xent_rows_grad_(logits, losses, targets, V, scale, smoothing=0.0, z_loss=0.0):
    """One block of rows of the chunked classifier: losses (N,) per row, then the logits
    overwritten with d(mean loss)/d(logits) for a unit loss grad, scale = 1 / (rows counted
    in the whole batch); ignored rows and padded columns become 0."""
    _xent_rows_grad[blocks(logits.shape[0], 1), THREADS](logits, losses, ids_to_device(targets), V, scale,
                                                         smoothing, z_loss)


def xent_mean(loss, losses, targets):
    """loss (1,) = mean of losses (N,) over targets >= 0 (0 when none counts)."""
    _xent_mean[1, THREADS](loss, losses, ids_to_device(targets))


def logprobs_forward(lp, lse, logits, targets, V):
    """lp (N,) = log softmax(logits[n, :V])[targets[n]], 0 where the target is -1; lse saved."""
    _logprobs_forward[blocks(logits.shape[0], 1), THREADS](lp, lse, logits, ids_to_device(targets), V)


def logprobs_backward(dlogits, dlp, logits, lse, targets, V):
    """Accumulate dlogits[n] += dlp[n] * (onehot(target) - softmax) for counted positions."""
    _logprobs_backward[blocks(logits.shape[0], 1), THREADS](dlogits, dlp, logits, lse, ids_to_device(targets), V)


def kl_div_forward(loss, rows, lse, logits, teacher, targets, V, temperature):
    """loss (1,) = mean over counted positions of rows[n] = T^2 KL(softmax(teacher/T) ||
    softmax(logits/T)); lse (N, 2) saved."""
    targets = ids_to_device(targets)
    _kl_rows[blocks(logits.shape[0], 1), THREADS](rows, lse, logits, teacher, targets, V, temperature)
    _xent_mean[1, THREADS](loss, rows, targets)


def kl_div_backward(dlogits, dloss, logits, teacher, lse, targets, V, temperature):
    """Accumulate dlogits += dloss * T / count * (softmax(logits/T) - softmax(teacher/T))."""
    _kl_backward[blocks(logits.shape[0], 1), THREADS](dlogits, dloss, logits, teacher, lse,
                                                      ids_to_device(targets), V, temperature)
