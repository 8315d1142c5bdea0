"""Elementwise ops on flat arrays."""
from numba import njit, prange


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
