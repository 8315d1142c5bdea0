import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def split(qkv, NH, NKV):
    hs = qkv.shape[-1] // (NH + 2 * NKV)
    B, T, _ = qkv.shape
    return qkv[..., :(NH + NKV) * hs].reshape(B, T, NH + NKV, hs), hs


def rope_interleaved_reference(qkv, NH, NKV, pos0, theta):
    """Meta's LLaMA reference: view pairs (2i, 2i+1) as complex numbers, multiply by
    exp(j * pos * theta^(-2i/hs))."""
    qk, hs = split(qkv, NH, NKV)
    T = qkv.shape[1]
    freqs = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    angles = np.outer(np.arange(pos0, pos0 + T), freqs)          # (T, hs/2)
    z = qk[..., 0::2] + 1j * qk[..., 1::2]
    z = z * np.exp(1j * angles)[None, :, None, :]
    out = qkv.copy()
    rot = np.stack([z.real, z.imag], axis=-1).reshape(qk.shape)
    out[..., :(NH + NKV) * hs] = rot.reshape(qkv.shape[0], T, -1)
    return out


def rope_half_reference(qkv, NH, NKV, pos0, theta):
    """HF transformers: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    qk, hs = split(qkv, NH, NKV)
    T = qkv.shape[1]
    freqs = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    angles = np.outer(np.arange(pos0, pos0 + T), freqs)
    emb = np.concatenate([angles, angles], axis=-1)[None, :, None, :]
    x1, x2 = qk[..., :hs // 2], qk[..., hs // 2:]
    rotated = np.concatenate([-x2, x1], axis=-1)
    out = qkv.copy()
    out[..., :(NH + NKV) * hs] = (qk * np.cos(emb) + rotated * np.sin(emb)).reshape(qkv.shape[0], T, -1)
    return out


REFERENCES = {"interleaved": rope_interleaved_reference, "half": rope_half_reference}


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("T,pos0", [(6, 0), (1, 9), (3, 100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_matches_published_formula(pairing, T, pos0, dtype):
    NH, NKV, hs = 4, 2, 8
    qkv = np.random.default_rng(0).standard_normal((2, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.rope(t, p["qkv"], NH, NKV, pos0, 500.0, pairing), {"qkv": qkv}, dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out.data, REFERENCES[pairing](qkv, NH, NKV, pos0, 500.0), rtol=tol, atol=tol)


def test_rope_pairings_differ():
    qkv = np.random.default_rng(1).standard_normal((1, 3, 24))
    assert not np.allclose(rope_interleaved_reference(qkv, 2, 1, 0, 1e4), rope_half_reference(qkv, 2, 1, 0, 1e4))


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_rope_backward_finite_differences(pairing):
    NH, NKV, hs = 2, 1, 4
    qkv = np.random.default_rng(2).standard_normal((2, 3, (NH + 2 * NKV) * hs))
    check_grads(lambda t, p: ops.rope(t, p["qkv"], NH, NKV, 5, 10.0, pairing), {"qkv": qkv})


def test_rope_rejects_bad_input():
    _, p, _ = run_op(lambda t, p: p["qkv"], {"qkv": np.ones((1, 2, 18))})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="even"):
        ops.rope(t, p["qkv"], 2, 2)  # hs = 3
    with pytest.raises(ValueError, match="pairing"):
        ops.rope(t, p["qkv"], 1, 1, pairing="neox")
    with pytest.raises(ValueError, match="pos0"):
        ops.rope(t, p["qkv"], 3, 3, pos0=-1)


def test_rope_kernels_refuse_a_table_of_another_shape():
    from nt.kernels.cpu import rope_backward, rope_forward
    qkv = np.zeros((1, 4, 3 * 8))   # NH = NKV = 1, hs = 8, T = 4
    for bad in (np.zeros((3, 8)), np.zeros((4, 6))):
        with pytest.raises(ValueError, match="table"):
            rope_forward(qkv, 1, 1, bad, True)
        with pytest.raises(ValueError, match="table"):
            rope_backward(qkv.copy(), qkv, 1, 1, bad, True)


def llama3_scaled_frequencies(hs, theta, factor, low, high, context):
    """Meta's Llama-3.1 apply_scaling, written out as its loop."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, hs, 2) / hs):
        wavelen = 2 * np.pi / freq
        if wavelen < context / high:
            out.append(freq)
        elif wavelen > context / low:
            out.append(freq / factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_rope_llama3_scaling_matches_reference_and_rotates_by_it():
    hs, theta, scaling = 64, 500000.0, (32.0, 1.0, 4.0, 8192)
    freqs = llama3_scaled_frequencies(hs, theta, *scaling)
    np.testing.assert_allclose(ops.rope_frequencies(hs, theta, scaling), freqs, rtol=1e-14)
    assert (freqs < 1.0 / theta ** (np.arange(0, hs, 2) / hs)).any()  # some were rescaled
    NH, NKV, T, pos0 = 2, 1, 3, 5000
    qkv = np.random.default_rng(3).standard_normal((1, T, (NH + 2 * NKV) * hs))
    _, _, out = run_op(lambda t, p: ops.rope(t, p["qkv"], NH, NKV, pos0, theta, "half", scaling), {"qkv": qkv})
    qk, _ = split(qkv, NH, NKV)
    angles = np.outer(np.arange(pos0, pos0 + T), freqs)
    emb = np.concatenate([angles, angles], -1)[None, :, None, :]
    rotated = np.concatenate([-qk[..., hs // 2:], qk[..., :hs // 2]], -1)
    expected = (qk * np.cos(emb) + rotated * np.sin(emb)).reshape(1, T, -1)
    np.testing.assert_allclose(out.data[..., :(NH + NKV) * hs], expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="scaling"):
        ops.rope_frequencies(hs, theta, (32.0, 4.0, 1.0, 8192))


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_rope_in_place_equals_rope_and_its_gradients(pairing):
    """rope_ rotates an op output in its own memory; the backward rotates the shared grad
    slot back. Forward equal to rope, gradients checked by finite differences."""
    NH, NKV, hs = 2, 1, 4
    qkv = np.random.default_rng(3).standard_normal((2, 3, (NH + 2 * NKV) * hs))
    _, _, want = run_op(lambda t, p: ops.rope(t, ops.scale(t, p["qkv"], 2.0), NH, NKV, 5, 10.0, pairing), {"qkv": qkv})
    t, _, got = run_op(lambda t, p: ops.rope_(t, ops.scale(t, p["qkv"], 2.0), NH, NKV, 5, 10.0, pairing), {"qkv": qkv})
    np.testing.assert_array_equal(got.data, want.data)
    check_grads(lambda t, p: ops.rope_(t, ops.scale(t, p["qkv"], 2.0), NH, NKV, 5, 10.0, pairing), {"qkv": qkv})


def test_rope_in_place_refuses_a_parameter():
    t, p, _ = run_op(lambda t, p: p["qkv"], {"qkv": np.ones((1, 2, 16))})
    with pytest.raises(ValueError, match="op output"):
        ops.rope_(t, p["qkv"], 2, 1)


def test_rope_backward_keeps_its_forwards_table():
    """The ops keep one cos/sin table per (hs, theta, scaling) and remake it when the
    positions change; a backward recorded before that still rotates by its own angles."""
    NH, NKV, hs = 2, 1, 4
    qkv = np.random.default_rng(5).standard_normal((1, 3, (NH + 2 * NKV) * hs))
    dout = np.random.default_rng(6).standard_normal(qkv.shape)
    t, p, out = run_op(lambda t, p: ops.rope(t, p["qkv"], NH, NKV, 7, 10.0), {"qkv": qkv})
    run_op(lambda t, p: ops.rope(t, p["qkv"], NH, NKV, 2, 10.0), {"qkv": qkv[:, :2]})  # remade: other positions
    p.zero_grad()
    t.backward(out, dout)
    # the rotation is orthogonal: the grad is dout rotated back by positions 7..9's angles
    qk, _ = split(dout, NH, NKV)
    angles = -np.outer(np.arange(7, 10), 1.0 / 10.0 ** (np.arange(0, hs, 2) / hs))
    emb = np.concatenate([angles, angles], -1)[None, :, None, :]
    rotated = np.concatenate([-qk[..., hs // 2:], qk[..., :hs // 2]], -1)
    want = dout.copy()
    want[..., :(NH + NKV) * hs] = (qk * np.cos(emb) + rotated * np.sin(emb)).reshape(1, 3, -1)
    np.testing.assert_allclose(p["qkv"].grad, want, rtol=1e-12, atol=1e-12)
