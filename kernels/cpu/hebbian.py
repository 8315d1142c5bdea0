"""Hebbian weight updates: a linear layer learns from its own input and output activations,
with no backward pass. One fused pass over the weight, rows in parallel.

For a batch of N (input x_n, output y_n) pairs, with the batch mean standing for the
expectation over inputs, row i of W (OC, C) becomes

    plain Hebb with decay:  W_i += lr * (mean_n y_ni x_n - decay * W_i)
    Oja's rule, per row:    W_i += lr * (mean_n y_ni x_n - mean_n y_ni^2 * W_i)

Oja's rule here is Oja's single-neuron rule (1982) applied to each output unit on its own
(not the subspace rule, which subtracts sum_k y_k W_k and decorrelates the rows): each row
keeps a bounded norm and, with y_i = W_i . x, turns towards the inputs' principal direction;
with y clamped to a target (1 for the class of x, 0 otherwise) it converges to the mean of
its class's inputs.
"""
from numba import njit, prange


@njit(parallel=True, cache=True)
def hebbian_update(weight, x, y, lr, decay, oja):
    """weight (OC, C) += lr * (mean_n y[n, i] x[n] - c_i weight[i]) for every row i, where
    c_i = mean_n y[n, i]^2 when `oja` else `decay`. x (N, C), y (N, OC)."""
    OC, C = weight.shape
    N = x.shape[0]
    for i in prange(OC):
        w = weight[i]
        c = decay
        if oja:
            c = 0.0
            for n in range(N):
                c += y[n, i] * y[n, i]
            c /= N
        keep = 1.0 - lr * c
        for j in range(C):
            w[j] *= keep
        # W (1 - lr c) + lr mean(y x): the Hebbian term never reads W, so no copy of the old row
        for n in range(N):
            a = lr * y[n, i] / N
            xn = x[n]
            for j in range(C):
                w[j] += a * xn[j]
