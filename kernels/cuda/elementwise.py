"""Elementwise and structural ops on flat device arrays (or (N, C) rows for concat)."""
from numba import cuda

from . import reduce
from .activations import _act, _dact
from .launch import THREADS, block_sum, blocks, shared_bytes
from .memory import scratch


@cuda.jit(cache=True)
def _add_forward(out, a, b):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit(cache=True)
def _add_backward(da, db, dout):
    for i in range(cuda.grid(1), dout.shape[0], cuda.gridsize(1)):
        da[i] += dout[i]
        db[i] += dout[i]


@cuda.jit(cache=True)
def _mul_forward(out, a, b):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] * b[i]


@cuda.jit(cache=True)
def _mul_backward(da, db, dout, a, b):
    for i in range(cuda.grid(1), dout.shape[0], cuda.gridsize(1)):
        da[i] += dout[i] * b[i]
        db[i] += dout[i] * a[i]


@cuda.jit(cache=True)
def _scale_forward(out, x, s):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        out[i] = s[0] * x[i]


@cuda.jit(cache=True)
def _scale_backward_x(dx, dout, s):
    for i in range(cuda.grid(1), dx.shape[0], cuda.gridsize(1)):
        dx[i] += s[0] * dout[i]


@cuda.jit(cache=True)
def _scale_backward_s_partial(partial, dout, x):
    """Stage 1 of ds = sum(x * dout): partial[block, 0] = this block's grid-stride share."""
    buf = cuda.shared.array(0, x.dtype)
    s = x.dtype.type(0)
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        s += x[i] * dout[i]
    s = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x, 0] = s


@cuda.jit(cache=True)
def _concat(out, a, b, backward):
    """Forward: out = [a | b] per row. Backward: a += out[:, :Ca], b += out[:, Ca:]."""
    N, Ca = a.shape
    Cb = b.shape[1]
    W = Ca + Cb
    for i in range(cuda.grid(1), N * W, cuda.gridsize(1)):
        n = i // W
        c = i % W
        if backward:
            if c < Ca:
                a[n, c] += out[n, c]
            else:
                b[n, c - Ca] += out[n, c]
        else:
            out[n, c] = a[n, c] if c < Ca else b[n, c - Ca]


def add_forward(out, a, b):
    """out = a + b (the residual connection)."""
    _add_forward[blocks(out.shape[0]), THREADS](out, a, b)


def add_backward(da, db, dout):
    """Accumulate da += dout and db += dout."""
    _add_backward[blocks(dout.shape[0]), THREADS](da, db, dout)


def mul_forward(out, a, b):
    """out = a * b."""
    _mul_forward[blocks(out.shape[0]), THREADS](out, a, b)


def mul_backward(da, db, dout, a, b):
    """Accumulate da += dout * b and db += dout * a."""
    _mul_backward[blocks(dout.shape[0]), THREADS](da, db, dout, a, b)


def scale_forward(out, x, s):
    """out = s[0] * x, s a (1,) device array."""
    _scale_forward[blocks(x.shape[0]), THREADS](out, x, s)


def scale_backward(dx, ds, dout, x, s):
    """Accumulate dx += s[0] * dout and, when ds is not empty, ds[0] += sum(x * dout)."""
    _scale_backward_x[blocks(x.shape[0]), THREADS](dx, dout, s)
    if ds.shape[0] > 0:  # two stages: a fixed grid for n, then its partials in block order
        nb = blocks(x.shape[0])
        partial = scratch(nb, x.dtype).reshape(nb, 1)
        _scale_backward_s_partial[nb, THREADS, 0, shared_bytes(x.dtype)](partial, dout, x)
        reduce.sum_partials(ds, partial)


def concat_forward(out, a, b):
    """out (N, Ca + Cb) = [a (N, Ca) | b (N, Cb)] along the feature axis."""
    _concat[blocks(out.size), THREADS](out, a, b, False)


def concat_backward(da, db, dout):
    """Accumulate da += dout[:, :Ca] and db += dout[:, Ca:]."""
    _concat[blocks(dout.size), THREADS](dout, da, db, True)


@cuda.jit(cache=True)
def _sum_rows_forward(out, inp):
    """One thread per row, the row summed in order (as on the CPU)."""
    N, C = inp.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        s = inp.dtype.type(0)
        for c in range(C):
            s += inp[n, c]
        out[n] = s


@cuda.jit(cache=True)
def _sum_rows_backward(dinp, dout):
    N, C = dinp.shape
    for i in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        dinp[i // C, i % C] += dout[i // C]


def sum_rows_forward(out, inp):
    """out (N,) = sum over the row of inp (N, C)."""
    _sum_rows_forward[blocks(inp.shape[0]), THREADS](out, inp)


def sum_rows_backward(dinp, dout):
    """Accumulate dinp[n, c] += dout[n]."""
    _sum_rows_backward[blocks(dinp.size), THREADS](dinp, dout)


@cuda.jit(cache=True)
def _bias_act_forward(out, pre, bias, kind):
    """pre += bias, out = act(pre), one thread per element (adjacent threads: adjacent columns)."""
    N, C = pre.shape
    has_bias = bias.shape[0] > 0
    for i in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        n = i // C
        c = i % C
        v = pre[n, c]
        if has_bias:
            v += bias[c]
            pre[n, c] = v
        out[n, c] = _act(v, kind)


@cuda.jit(cache=True)
def _bias_act_backward(dpre, dout, pre, kind):
    """dpre += act'(pre) * dout, one thread per element."""
    N, C = pre.shape
    for i in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        n = i // C
        c = i % C
        dpre[n, c] += _dact(pre[n, c], kind) * dout[n, c]


def bias_act_forward(out, pre, bias, kind):
    """pre (N, C) += bias (may be empty), then out = act(pre) (activations' kinds), one pass."""
    _bias_act_forward[blocks(pre.size), THREADS](out, pre, bias, kind)


def bias_act_backward(dpre, dout, pre, kind):
    """Accumulate dpre += act'(pre) * dout (the bias grad: the matmul's backward)."""
    _bias_act_backward[blocks(pre.size), THREADS](dpre, dout, pre, kind)
