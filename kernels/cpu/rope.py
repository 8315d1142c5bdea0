"""Rotary position embedding (RoPE) on the q and k heads of a fused qkv tensor.

qkv is (B, T, (NH + 2*NKV) * hs) as in attention.py. Position p = pos0 + t rotates pair i
(i < hs/2) of every q and k head by the angle p * inv_freq[i], where inv_freq (hs/2,) is
theta^(-2i/hs), possibly rescaled (Llama-3). Two pairings exist:
  interleaved (half=False): pair i is channels (2i, 2i+1)    RoFormer, Meta's LLaMA code,
                                                              llama.cpp's LLAMA arch
  half-split  (half=True):  pair i is channels (i, i + hs/2) HF transformers, GPT-NeoX
v heads are left alone. The backward is the same rotation by the negative angle.

The kernels read the angles' cosines and sines from a float64 table cs (T, hs), row t
being [cos | sin] of (pos0 + t) * inv_freq, made by the op once per positions and
frequencies and shared by every layer, batch row and head (computing them here, B*T*hs/2
cos and sin a call, was two thirds of the kernel's time); the rotation is float64 as
before. The forward rotates in place (ops.rope_ on the qkv buffer, its backward on the
grad): reading and writing through the same slices lets LLVM vectorise the pair loop,
which an out-of-place loop handed the same array twice does not (its overlap check fails).
"""
import numpy as np
from numba import njit, prange


@njit(cache=True)
def _rotate_row(out, inp, p, inv_freq, half, sign, NQK, hs, accumulate):
    """Rotate the NQK q/k heads of one position p (a row of width >= NQK*hs), computing each
    pair's cos/sin (float64) here: the fused decode step's rotation (decode.py), one position
    a token, where a table would cost the same trig. sign = -1 rotates backwards; accumulate
    adds into out instead of storing."""
    half_hs = hs // 2
    for i in range(half_hs):
        angle = p * inv_freq[i]
        c = np.cos(angle)
        s = sign * np.sin(angle)
        for h in range(NQK):
            if half:
                a = h * hs + i
                b = a + half_hs
            else:
                a = h * hs + 2 * i
                b = a + 1
            x0 = inp[a]
            x1 = inp[b]
            y0 = x0 * c - x1 * s
            y1 = x0 * s + x1 * c
            if accumulate:
                out[a] += y0
                out[b] += y1
            else:
                out[a] = y0
                out[b] = y1


@njit(cache=True)
def _check_table(cs, T, hs):
    if cs.shape[0] != T or cs.shape[1] != hs:
        raise ValueError("rope: the cos/sin table must be (T, hs)")


@njit(cache=True)
def _rotate_in_place(row, cos, sin, half, NQK):
    """Rotate the NQK q/k heads at the start of one position's row by the given angles."""
    half_hs = cos.shape[0]
    hs = 2 * half_hs
    for h in range(NQK):
        x = row[h * hs:(h + 1) * hs]
        if half:
            x0 = x[:half_hs]
            x1 = x[half_hs:]
            for i in range(half_hs):
                u = x0[i]
                v = x1[i]
                x0[i] = u * cos[i] - v * sin[i]
                x1[i] = u * sin[i] + v * cos[i]
        else:
            for i in range(half_hs):
                u = x[2 * i]
                v = x[2 * i + 1]
                x[2 * i] = u * cos[i] - v * sin[i]
                x[2 * i + 1] = u * sin[i] + v * cos[i]


@njit(parallel=True, cache=True)
def rope_forward(qkv, NH, NKV, cs, half):
    """Rotate qkv's (B, T, W) q and k heads in place by the angles of the table cs (T, hs);
    a table with negated sines rotates back (the backward of an in-place rotation)."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    _check_table(cs, T, hs)
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        _rotate_in_place(qkv[b, t], cs[t, :hs // 2], cs[t, hs // 2:], half, NH + NKV)


@njit(parallel=True, cache=True)
def rope_backward(dqkv, dout, NH, NKV, cs, half):
    """Accumulate dqkv += dout rotated by the negative angles (v grads pass through)."""
    B, T, W = dout.shape
    hs = W // (NH + 2 * NKV)
    _check_table(cs, T, hs)
    half_hs = hs // 2
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        cos = cs[t, :half_hs]
        sin = cs[t, half_hs:]
        for h in range(NH + NKV):
            d = dqkv[b, t, h * hs:(h + 1) * hs]
            g = dout[b, t, h * hs:(h + 1) * hs]
            for i in range(half_hs):
                a, a2 = (i, i + half_hs) if half else (2 * i, 2 * i + 1)
                d[a] += g[a] * cos[i] + g[a2] * sin[i]
                d[a2] += g[a2] * cos[i] - g[a] * sin[i]
        for c in range((NH + NKV) * hs, W):
            dqkv[b, t, c] += dout[b, t, c]
