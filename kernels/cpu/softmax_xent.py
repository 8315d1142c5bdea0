"""Softmax over the last axis, and fused softmax + cross-entropy over a padded vocabulary.

Cross-entropy: logits are (N, Vp) with Vp >= V; columns V..Vp-1 are padding and take no
part. A target of -1 marks a position that contributes nothing (the ignore index). Per
counted row, with lse = log sum_v exp(z_v) and eps the label smoothing:
    loss = (1 - eps) * (lse - z_target) + eps * mean_v (lse - z_v) + z_loss * lse^2
(PyTorch's label_smoothing; PaLM's z-loss), and the mean over counted rows is reported.
Its gradient is p_v (1 + 2 z_loss lse) - (1 - eps) onehot_v - eps / V. Probabilities are
never stored: the backward recomputes them from the saved lse.

Arithmetic stays in the logits' float type with vmath's vectorizable exp; `reassoc` lets
the row sums vectorize (LLVM keeps many partial sums, which also bounds float32 rounding).
"""
import numpy as np
from numba import njit, prange

from . import vmath
from .vmath import like

FASTMATH = {"reassoc", "contract"}


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_forward(out, inp):
    """out (N, C) = softmax of each row of inp."""
    N, C = inp.shape
    for n in prange(N):
        x = inp[n]
        m = like(x[0], -np.inf)
        for c in range(C):
            m = max(m, x[c])
        s = like(m, 0.0)
        for c in range(C):
            e = vmath.exp(x[c] - m)
            out[n, c] = e
            s += e
        inv = like(m, 1.0) / s
        for c in range(C):
            out[n, c] *= inv


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_backward(dinp, dout, out):
    """Accumulate dinp += y * (dy - sum(dy * y)) per row, y the softmax output."""
    N, C = out.shape
    for n in prange(N):
        dot = like(out[0, 0], 0.0)
        for c in range(C):
            dot += dout[n, c] * out[n, c]
        for c in range(C):
            dinp[n, c] += out[n, c] * (dout[n, c] - dot)


@njit(cache=True, fastmath=FASTMATH)
def _sum_exp(row, V, scale, shift):
    """sum_v exp(scale * row[v] - shift) over the first V entries."""
    s = like(shift, 0.0)
    for v in range(V):
        s += vmath.exp(row[v] * scale - shift)
    return s


@njit(cache=True, fastmath=FASTMATH)
def _log_sum_exp(row, V, scale):
    """log sum_v exp(scale * row[v]) over the first V entries, in one pass when it can.

    The usual shift by the row's max costs a pass of its own, as slow as the exp sum: LLVM
    does not vectorise a max reduction (it did not under reassoc, nnan or a select). So the
    sum is shifted by the row's first entry instead: no greater than the max, so the sum is
    >= 1 and nothing that matters underflows; it overflows only if some entry exceeds the
    first by ~88 - log(V) (logits differ by tens), and an overflowed or NaN sum is redone
    with the max (NaN entries give NaN either way).
    """
    m = row[0] * scale
    s = _sum_exp(row, V, scale, m)
    if not s < np.inf:
        m = like(m, -np.inf)
        for v in range(V):
            m = max(m, row[v] * scale)
        s = _sum_exp(row, V, scale, m)
    return m + np.log(s)


@njit(cache=True, fastmath=FASTMATH)
def _row_max(row, V):
    """max of row[:V] (NaN entries may be skipped: they make the row's sum NaN anyway).
    LLVM vectorises no max reduction, nor an elementwise max into a small array here
    (both ran at the exp pass's speed); eight running maxima over consecutive entries,
    written out, run 1.5x faster (d6's rows: 4.8 -> 3.2 ms a 512-row chunk, the read
    alone 2.4)."""
    n = V // 8
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    for i in range(n):
        r = row[i * 8:i * 8 + 8]
        m0 = r[0] if r[0] > m0 else m0
        m1 = r[1] if r[1] > m1 else m1
        m2 = r[2] if r[2] > m2 else m2
        m3 = r[3] if r[3] > m3 else m3
        m4 = r[4] if r[4] > m4 else m4
        m5 = r[5] if r[5] > m5 else m5
        m6 = r[6] if r[6] > m6 else m6
        m7 = r[7] if r[7] > m7 else m7
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for v in range(n * 8, V):
        m = max(m, row[v])
    return m


@njit(cache=True, inline="always")
def _logit_sum(row, V, smoothing):
    """sum of row[:V], needed by label smoothing only (0 without)."""
    zsum = like(row[0], 0.0)
    if smoothing != 0.0:
        for v in range(V):
            zsum += row[v]
    return zsum


@njit(cache=True, inline="always")
def _xent_loss(zt, zsum, L, V, smoothing, z_loss):
    """One counted row's loss from its target logit zt, logit sum zsum and log-sum-exp L
    (the formula in the module docstring)."""
    return (1.0 - smoothing) * (L - zt) + smoothing * (L - zsum / V) + z_loss * L * L


@njit(cache=True, inline="always")
def _xent_row_loss(row, tgt, L, V, smoothing, z_loss):
    """One counted row's loss, its log-sum-exp L given."""
    return _xent_loss(row[tgt], _logit_sum(row, V, smoothing), L, V, smoothing, z_loss)


@njit(cache=True, inline="always")
def _xent_row_grad_(row, tgt, L, V, scale, smoothing, z_loss):
    """Overwrite a counted row's logits with scale * (p (1 + 2 z_loss L) - (1-eps) onehot -
    eps/V), padded columns with 0."""
    pscale = like(L, scale * (1.0 + 2.0 * z_loss * L))
    uniform = like(L, scale * smoothing / V)
    for v in range(V):
        row[v] = pscale * vmath.exp(row[v] - L) - uniform
    row[V:] = 0.0
    row[tgt] -= scale * (1.0 - smoothing)


@njit(cache=True)
def xent_mean(loss, losses, targets):
    """loss (1,) = mean of losses (N,) over targets >= 0 (0 when none counts), summed in a
    fixed order: the same loss for any thread count."""
    total = 0.0
    count = 0
    for n in range(losses.shape[0]):
        if targets[n] >= 0:
            total += losses[n]
            count += 1
    loss[0] = total / count if count > 0 else 0.0


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_xent_forward(loss, losses, lse, logits, targets, V, smoothing=0.0, z_loss=0.0):
    """loss (1,) = mean of losses (N,) over targets >= 0; lse (N,) saved for the backward."""
    N = logits.shape[0]
    one = like(logits[0, 0], 1.0)
    for n in prange(N):
        row = logits[n]
        L = _log_sum_exp(row, V, one)
        lse[n] = L
        tgt = targets[n]
        losses[n] = _xent_row_loss(row, tgt, L, V, smoothing, z_loss) if tgt >= 0 else 0.0
    xent_mean(loss, losses, targets)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def xent_rows_grad_(logits, losses, targets, V, scale, smoothing=0.0, z_loss=0.0):
    """One block of rows of the chunked classifier (ops.classifier_xent with a frozen
    weight): each counted row's loss into losses (N,) (0 for ignored rows), then the row
    overwritten with d(mean loss)/d(logits) for a unit loss grad, `scale` being 1 / (the
    rows counted in the whole batch); ignored rows and padded columns become 0."""
    N = logits.shape[0]
    one = like(logits[0, 0], 1.0)
    for n in prange(N):
        row = logits[n]
        tgt = targets[n]
        if tgt < 0:
            losses[n] = 0.0
            row[:] = 0.0
            continue
        # one exp an entry, not two (a log-sum-exp pass, then the probabilities' pass): the
        # row is overwritten anyway, so the exps are kept in it, shifted by the row's max
        # (a pass without exps, as cheap as a copy), and the grad pass only scales them
        m = _row_max(row, V)
        zt, zsum = row[tgt], _logit_sum(row, V, smoothing)
        e = row[:V]
        s = like(m, 0.0)
        for v in range(V):
            x = vmath.exp(e[v] - m)
            e[v] = x
            s += x
        L = m + np.log(s)
        losses[n] = _xent_loss(zt, zsum, L, V, smoothing, z_loss)
        # p (1 + 2 z_loss L) scale = e / s (1 + 2 z_loss L) scale
        pscale = like(L, scale * (1.0 + 2.0 * z_loss * L)) / s
        uniform = like(L, scale * smoothing / V)
        for v in range(V):
            e[v] = pscale * e[v] - uniform
        row[V:] = 0.0
        row[tgt] -= scale * (1.0 - smoothing)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_xent_backward(dlogits, dloss, logits, lse, targets, V, smoothing=0.0, z_loss=0.0):
    """Accumulate dlogits += dloss / count * (p (1 + 2 z_loss lse) - (1-eps) onehot - eps/V)."""
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
        pscale = like(L, scale * (1.0 + 2.0 * z_loss * L))
        uniform = like(L, scale * smoothing / V)
        for v in range(V):
            drow[v] += pscale * vmath.exp(row[v] - L) - uniform
        drow[tgt] -= scale * (1.0 - smoothing)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def softmax_xent_grad_(logits, dloss, lse, targets, V, smoothing=0.0, z_loss=0.0):
    """Overwrite logits (N, Vp) with the loss's gradient: dloss / count * (p (1 + 2 z_loss
    lse) - (1-eps) onehot - eps/V) on counted rows, 0 on ignored rows and padded columns.
    The fused classifier's backward (llm.c's trick): the gradient takes the logits' memory,
    so it never needs its own (N, Vp) array, and feeds the dX and dW gemms from there."""
    N, Vp = logits.shape
    count = 0
    for n in range(N):
        if targets[n] >= 0:
            count += 1
    scale = dloss[0] / count if count > 0 else 0.0
    for n in prange(N):
        row = logits[n]
        tgt = targets[n]
        if tgt < 0:
            row[:] = 0.0
            continue
        _xent_row_grad_(row, tgt, lse[n], V, scale, smoothing, z_loss)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def logprobs_forward(lp, lse, logits, targets, V):
    """lp (N,) = log softmax(logits[n, :V])[targets[n]], 0 where the target is -1; lse (N,)
    saved. The (N, V) log-probabilities are never formed."""
    N = logits.shape[0]
    one = like(logits[0, 0], 1.0)
    for n in prange(N):
        row = logits[n]
        L = _log_sum_exp(row, V, one)
        lse[n] = L
        tgt = targets[n]
        lp[n] = row[tgt] - L if tgt >= 0 else 0.0


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def logprobs_backward(dlogits, dlp, logits, lse, targets, V):
    """Accumulate dlogits[n] += dlp[n] * (onehot(target) - softmax) for counted positions."""
    N = logits.shape[0]
    for n in prange(N):
        tgt = targets[n]
        if tgt < 0:
            continue
        row = logits[n]
        drow = dlogits[n]
        L = lse[n]
        g = dlp[n]
        for v in range(V):
            drow[v] -= g * vmath.exp(row[v] - L)
        drow[tgt] += g


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def kl_div_forward(loss, rows, lse, logits, teacher, targets, V, temperature):
    """Distillation loss (1,) = mean over counted positions (target >= 0) of
    rows[n] = T^2 * KL(softmax(teacher[n] / T) || softmax(logits[n] / T)) over the first V
    columns. lse (N, 2) saved: the student's and the teacher's log-sum-exp of the scaled rows."""
    N = logits.shape[0]
    inv_t = like(logits[0, 0], 1.0 / temperature)
    for n in prange(N):
        rows[n] = 0.0
        if targets[n] < 0:
            continue
        s_row = logits[n]
        t_row = teacher[n]
        Ls = _log_sum_exp(s_row, V, inv_t)
        Lt = _log_sum_exp(t_row, V, inv_t)
        lse[n, 0] = Ls
        lse[n, 1] = Lt
        kl = like(inv_t, 0.0)
        for v in range(V):
            zt = t_row[v] * inv_t - Lt
            kl += vmath.exp(zt) * (zt - (s_row[v] * inv_t - Ls))
        rows[n] = temperature * temperature * kl
    xent_mean(loss, rows, targets)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def kl_div_backward(dlogits, dloss, logits, teacher, lse, targets, V, temperature):
    """Accumulate dlogits += dloss * T / count * (softmax(logits / T) - softmax(teacher / T))."""
    N = logits.shape[0]
    count = 0
    for n in range(N):
        if targets[n] >= 0:
            count += 1
    if count == 0:
        return
    inv_t = like(logits[0, 0], 1.0 / temperature)
    scale = like(inv_t, dloss[0] * temperature / count)
    for n in prange(N):
        if targets[n] < 0:
            continue
        Ls, Lt = lse[n, 0], lse[n, 1]
        for v in range(V):
            ps = vmath.exp(logits[n, v] * inv_t - Ls)
            pt = vmath.exp(teacher[n, v] * inv_t - Lt)
            dlogits[n, v] += scale * (ps - pt)
