"""Hebbian weight updates (see the CPU twin for the rules): one thread per weight element."""
from numba import cuda

from .launch import THREADS, blocks


@cuda.jit(cache=True)
def _hebbian_update(weight, x, y, lr, decay, oja):
    OC, C = weight.shape
    N = x.shape[0]
    for e in range(cuda.grid(1), OC * C, cuda.gridsize(1)):
        i = e // C
        j = e % C
        dt = weight.dtype.type
        hebb = dt(0)
        c = dt(0)
        for n in range(N):
            hebb += y[n, i] * x[n, j]
            c += y[n, i] * y[n, i]
        if not oja:
            c = dt(decay) * dt(N)
        weight[i, j] += dt(lr) * (hebb - c * weight[i, j]) / dt(N)


def hebbian_update(weight, x, y, lr, decay, oja):
    """weight (OC, C) += lr * (mean_n y[n, i] x[n] - c_i weight[i]) for every row i, where
    c_i = mean_n y[n, i]^2 when `oja` else `decay`. x (N, C), y (N, OC)."""
    _hebbian_update[blocks(weight.size), THREADS](weight, x, y, float(lr), float(decay), bool(oja))
