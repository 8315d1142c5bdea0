"""Rotary position embedding on the q and k heads of a fused qkv tensor (see the CPU twin).

Position t's pair i of every q and k head is rotated by the angle whose cos and sin are
cs[t, i] and cs[t, hs/2 + i] (the op's float64 table (T, hs) of (pos0 + t) * inv_freq;
its inverse table has the sines negated). half=False pairs channels (2i, 2i+1), half=True
pairs (i, i + hs/2). One thread per (position, pair) reads its cos/sin once and rotates
that pair in every head. The forward rotates in place (v heads untouched); the backward
rotates by the negative angle and accumulates (v grads pass through).
"""
from numba import cuda

from .launch import THREADS, blocks
from .rmsnorm import _copy_values


@cuda.jit(cache=True)
def _rope(out, inp, NH, NKV, cs, half, sign, accumulate):
    B, T, W = inp.shape
    hs = W // (NH + 2 * NKV)
    half_hs = hs // 2
    for r in range(cuda.grid(1), B * T * half_hs, cuda.gridsize(1)):
        b = r // (T * half_hs)
        t = r // half_hs % T
        i = r % half_hs
        c = inp.dtype.type(cs[t, i])  # the rotation itself in the data's dtype
        s = inp.dtype.type(sign * cs[t, half_hs + i])
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


def _check_table(cs, T, hs):
    if cs.shape != (T, hs):
        raise ValueError("rope: the cos/sin table must be (T, hs)")


def rope_forward(qkv, NH, NKV, cs, half):
    """Rotate qkv's (B, T, W) q and k heads in place by the angles of the table cs (T, hs)
    (each pair is read, then written, by one thread)."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    _check_table(cs, T, hs)
    _rope[blocks(B * T * (hs // 2)), THREADS](qkv, qkv, NH, NKV, cs, half, 1.0, False)


def rope_backward(dqkv, dout, NH, NKV, cs, half):
    """Accumulate dqkv += dout rotated by the negative angles (v grads pass through)."""
    B, T, W = dout.shape
    hs = W // (NH + 2 * NKV)
    _check_table(cs, T, hs)
    _rope[blocks(B * T * (hs // 2)), THREADS](dqkv, dout, NH, NKV, cs, half, -1.0, True)
    _copy_values[blocks(B * T * NKV * hs), THREADS](dqkv, dout, (NH + NKV) * hs, True)
