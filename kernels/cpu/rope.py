"""Rotary position embedding (RoPE) on the q and k heads of a fused qkv tensor.

qkv is (B, T, (NH + 2*NKV) * hs) as in attention.py. Position p = pos0 + t rotates pair i
(i < hs/2) of every q and k head by the angle p * inv_freq[i], where inv_freq (hs/2,) is
theta^(-2i/hs), possibly rescaled (Llama-3), computed once by the op. Two pairings exist:
  interleaved (half=False): pair i is channels (2i, 2i+1)    RoFormer, Meta's LLaMA code,
                                                              llama.cpp's LLAMA arch
  half-split  (half=True):  pair i is channels (i, i + hs/2) HF transformers, GPT-NeoX
The v heads are copied. The backward is the same rotation by the negative angle.
cos/sin are computed in float64 per (position, pair) and shared by all heads: no cos/sin tables.
"""
import numpy as np
from numba import njit, prange


@njit(cache=True)
def _rotate_row(out, inp, p, inv_freq, half, sign, NQK, hs, accumulate):
    """Rotate the NQK q/k heads of one position (a row of width >= NQK*hs).
    sign = -1 rotates backwards; accumulate adds into out instead of storing."""
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


@njit(parallel=True, cache=True)
def rope_forward(out, qkv, NH, NKV, pos0, inv_freq, half):
    """out (B, T, W) = qkv with q and k heads rotated to positions pos0..pos0+T-1; out may
    be qkv itself (each pair is read before it is written). Negated inv_freq rotates back."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    v_off = (NH + NKV) * hs
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        _rotate_row(out[b, t], qkv[b, t], pos0 + t, inv_freq, half, 1.0, NH + NKV, hs, False)
        for c in range(v_off, W):   # a loop, not a slice copy: ops.rope_ passes out is qkv
            out[b, t, c] = qkv[b, t, c]


@njit(parallel=True, cache=True)
def rope_backward(dqkv, dout, NH, NKV, pos0, inv_freq, half):
    """Accumulate dqkv += dout rotated by the negative angles (v grads pass through)."""
    B, T, W = dout.shape
    hs = W // (NH + 2 * NKV)
    v_off = (NH + NKV) * hs
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        _rotate_row(dqkv[b, t], dout[b, t], pos0 + t, inv_freq, half, -1.0, NH + NKV, hs, True)
        for c in range(v_off, W):
            dqkv[b, t, c] += dout[b, t, c]
