"""Elementwise and structural ops on flat arrays (or (N, C) rows for concat)."""
from numba import njit, prange

from .activations import _act, _dact
from .vmath import CONTRACT


@njit(parallel=True, cache=True)
def add_forward(out, a, b):
    """out = a + b (the residual connection)."""
    for i in prange(out.shape[0]):
        out[i] = a[i] + b[i]


@njit(parallel=True, cache=True)
def add_backward(da, db, dout):
    """Accumulate da += dout and db += dout."""
    for i in prange(dout.shape[0]):
        da[i] += dout[i]
        db[i] += dout[i]


@njit(parallel=True, cache=True)
def mul_forward(out, a, b):
    """out = a * b."""
    for i in prange(out.shape[0]):
        out[i] = a[i] * b[i]


@njit(parallel=True, cache=True)
def mul_backward(da, db, dout, a, b):
    """Accumulate da += dout * b and db += dout * a."""
    for i in prange(dout.shape[0]):
        da[i] += dout[i] * b[i]
        db[i] += dout[i] * a[i]


@njit(parallel=True, cache=True)
def scale_forward(out, x, s):
    """out = s[0] * x, s a (1,) array (a constant or a learned scalar)."""
    c = s[0]
    for i in prange(x.shape[0]):
        out[i] = c * x[i]


@njit(parallel=True, cache=True)
def scale_backward(dx, ds, dout, x, s):
    """Accumulate dx += s[0] * dout and, when ds is not empty, ds[0] += sum(x * dout).

    The scalar's sum is serial: it is used for a few learned scales, and a serial sum
    does not depend on the thread count.
    """
    c = s[0]
    n = x.shape[0]
    for i in prange(n):
        dx[i] += c * dout[i]
    if ds.shape[0] > 0:
        total = 0.0
        for i in range(n):
            total += x[i] * dout[i]
        ds[0] += total


@njit(parallel=True, cache=True)
def concat_forward(out, a, b):
    """out (N, Ca + Cb) = [a (N, Ca) | b (N, Cb)] along the feature axis."""
    N, Ca = a.shape
    for n in prange(N):
        out[n, :Ca] = a[n]
        out[n, Ca:] = b[n]


@njit(parallel=True, cache=True)
def concat_backward(da, db, dout):
    """Accumulate da += dout[:, :Ca] and db += dout[:, Ca:]."""
    N, Ca = da.shape
    for n in prange(N):
        da[n] += dout[n, :Ca]
        db[n] += dout[n, Ca:]


@njit(parallel=True, cache=True)
def sum_rows_forward(out, inp):
    """out (N,) = sum over the row of inp (N, C) (e.g. a sequence's token log-probabilities)."""
    N, C = inp.shape
    for n in prange(N):
        s = inp[n, 0] * 0.0
        for c in range(C):
            s += inp[n, c]
        out[n] = s


@njit(parallel=True, cache=True)
def sum_rows_backward(dinp, dout):
    """Accumulate dinp[n, c] += dout[n]."""
    N, C = dinp.shape
    for n in prange(N):
        for c in range(C):
            dinp[n, c] += dout[n]


@njit(parallel=True, cache=True, fastmath=CONTRACT)
def bias_act_forward(out, pre, bias, kind):
    """pre (N, C) += bias (a matmul's output without its bias; bias may be empty), then
    out = act(pre) (activations.py's kinds): one pass. pre keeps the pre-activation for
    the backward."""
    N, C = pre.shape
    has_bias = bias.shape[0] > 0
    for n in prange(N):
        p = pre[n]
        o = out[n]
        for c in range(C):
            if has_bias:
                p[c] = p[c] + bias[c]
            o[c] = _act(p[c], kind)


@njit(parallel=True, cache=True, fastmath=CONTRACT)
def bias_act_backward(dpre, dout, pre, kind):
    """Accumulate dpre += act'(pre) * dout (the bias grad is summed from dpre by the
    matmul's backward, in its own pass over it)."""
    N, C = pre.shape
    for n in prange(N):
        d = dpre[n]
        dy = dout[n]
        p = pre[n]
        for c in range(C):
            d[c] += _dact(p[c], kind) * dy[c]
