"""Rotary position embedding on the q and k heads of a fused qkv tensor (see the CPU twin).

Position p = pos0 + t rotates pair i of every q and k head by p * inv_freq[i] (the op's
float64 frequency table, theta^(-2i/hs) possibly rescaled);
half=False pairs channels (2i, 2i+1), half=True pairs (i, i + hs/2). One thread per
(position, pair) computes cos/sin once in float64 and rotates that pair in every head;
the v heads are copied. The backward rotates by the negative angle and accumulates.
"""
import math

from numba import cuda

from .launch import THREADS, blocks
from .rmsnorm import _copy_values


@cuda.jit(cache=True)
def _rope(out, inp, NH, NKV, pos0, inv_freq, half, sign, accumulate):
    B, T, W = inp.shape
    hs = W // (NH + 2 * NKV)
    half_hs = hs // 2
    for r in range(cuda.grid(1), B * T * half_hs, cuda.gridsize(1)):
        b = r // (T * half_hs)
        t = r // half_hs % T
        i = r % half_hs
        angle = (pos0 + t) * inv_freq[i]  # float64: positions of 10^5 need it (as on the CPU)
        c = inp.dtype.type(math.cos(angle))  # the rotation itself in the data's dtype
        s = inp.dtype.type(sign * math.sin(angle))
        for h in range(NH + NKV):
            if half:
                a = h * hs + i
                a2 = a + half_hs
            else:
                a = h * hs + 2 * i
                a2 = a + 1
            x0 = inp[b, t, a]
            x1 = inp[b, t, a2]
            y0 = x0 * c - x1 * s
            y1 = x0 * s + x1 * c
            if accumulate:
                out[b, t, a] += y0
                out[b, t, a2] += y1
            else:
                out[b, t, a] = y0
                out[b, t, a2] = y1


def rope_forward(out, qkv, NH, NKV, pos0, inv_freq, half):
    """out (B, T, W) = qkv with q and k heads rotated to positions pos0..pos0+T-1."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    _rope[blocks(B * T * (hs // 2)), THREADS](out, qkv, NH, NKV, pos0, inv_freq, half, 1.0, False)
    _copy_values[blocks(B * T * NKV * hs), THREADS](out, qkv, (NH + NKV) * hs, False)


def rope_backward(dqkv, dout, NH, NKV, pos0, inv_freq, half):
    """Accumulate dqkv += dout rotated by the negative angles (v grads pass through)."""
    B, T, W = dout.shape
    hs = W // (NH + 2 * NKV)
    _rope[blocks(B * T * (hs // 2)), THREADS](dqkv, dout, NH, NKV, pos0, inv_freq, half, -1.0, True)
    _copy_values[blocks(B * T * NKV * hs), THREADS](dqkv, dout, (NH + NKV) * hs, True)
