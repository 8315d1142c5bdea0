"""BitNet b1.58 BitLinear on the GPU (twin of nt.kernels.cpu.bitnet's training kernels):

  weights, per tensor:  s = max(mean|W|, EPS)   Wq = clip(rint(W / s), -1, 1) * s
  activations, per row: a = max(max|x|, EPS)    xq = clip(rint(x * 127 / a), -128, 127) * a / 127
  out = xq @ Wq^T;  backward (straight-through): dx += dout @ Wq, dW += dout^T @ xq

The matmuls are matmul.py's (cuBLAS or the tiled kernel). The packed ternary matmul
(inference) is CPU only. rint rounds half to even, as NumPy's and the CPU kernels' do.
"""
import math

import numpy as np
from numba import cuda

from .launch import THREADS, block_max, block_sum, blocks
from .matmul import matmul_backward, matmul_forward

EPS = 1e-5


@cuda.jit(device=True, cache=True)
def _rint_clip(v, lo, hi):
    """v rounded to the nearest integer (ties to even), then clipped to [lo, hi]."""
    r = math.floor(v)
    frac = v - r
    if frac > 0.5 or (frac == 0.5 and r % 2 != 0):
        r += 1
    return min(max(r, lo), hi)


@cuda.jit(cache=True)
def _weight_scale(scale, w):
    """One block: scale[0] = max(mean |w|, EPS), summed in float64."""
    buf = cuda.shared.array(THREADS, np.float64)
    s = 0.0
    for i in range(cuda.threadIdx.x, w.shape[0], cuda.blockDim.x):
        s += abs(w[i])
    total = block_sum(buf, s)
    if cuda.threadIdx.x == 0:
        scale[0] = max(total / w.shape[0], EPS)


@cuda.jit(cache=True)
def _weight_apply(wq, scale, w):
    s = scale[0]
    for i in range(cuda.grid(1), w.shape[0], cuda.gridsize(1)):
        wq[i] = _rint_clip(w[i] / s, -1.0, 1.0) * s


@cuda.jit(cache=True)
def _act_quant(xq, xs, x):
    """One block per row (grid-stride over rows): the row's absmax, then its codes."""
    buf = cuda.shared.array(THREADS, np.float64)
    N, C = x.shape
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        a = 0.0
        for c in range(tid, C, cuda.blockDim.x):
            a = max(a, abs(x[n, c]))
        a = max(x.dtype.type(block_max(buf, a)), x.dtype.type(EPS))
        inv = x.dtype.type(127.0) / a
        step = a / x.dtype.type(127.0)
        for c in range(tid, C, cuda.blockDim.x):
            xq[n, c] = _rint_clip(x[n, c] * inv, -128.0, 127.0) * step
        if tid == 0:
            xs[n] = step


def weight_quant(wq, scale, w):
    """wq (n,) = ternary codes of w (n,) times s; scale (1,) <- s (device arrays)."""
    _weight_scale[1, THREADS](scale, w)
    _weight_apply[blocks(w.shape[0]), THREADS](wq, scale, w)


def act_quant(xq, xs, x):
    """Per row of x (N, C): xs[n] = a / 127, xq[n] = int8 codes times xs[n]."""
    _act_quant[blocks(x.shape[0], 1), THREADS](xq, xs, x)


def bitlinear_forward(out, xq, xs, wq, scale, x, w):
    """out (N, OC) = actquant(x) @ weightquant(w)^T; keeps xq, xs, wq and scale for the backward."""
    weight_quant(wq.reshape(-1), scale, w.reshape(-1))
    act_quant(xq, xs, x)
    matmul_forward(out, xq, wq, wq.reshape(-1)[:0], False)   # no bias


def bitlinear_backward(dx, dw, dout, xq, wq):
    """Straight-through estimator: dx += dout @ wq, dw += dout^T @ xq (an empty dw: frozen)."""
    matmul_backward(dx, dw, wq.reshape(-1)[:0], dout, xq, wq, False)   # no bias
