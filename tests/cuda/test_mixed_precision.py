"""bf16 mixed-precision training on the CUDA backend (a tape with precision="bf16"):
the bf16 matmuls equal a NumPy reference that rounds the operands the same way and
accumulates in float32-or-better, the weights' bf16 copies are RNE-exact and follow the
masters, and a tiny GPT-2 trains with losses close to float32's."""
import numpy as np
import pytest

import nt
from nt.kernels.cpu import quant as cpu_quant
from nt.kernels.cuda import bf16, matmul
from nt.models.gpt2 import GPT2, GPT2Config
from nt.optim import AdamW
from nt.tape import Tape

gpu = nt.backend("cuda")


def _bits(x):
    """bf16 bits of float32 x by the CPU's RNE (quantize_bf16), shaped like x."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.size, np.uint16)
    cpu_quant.quantize_bf16(out, x.reshape(-1).view(np.uint32))
    return out.reshape(x.shape)


def _rounded(x):
    """x rounded to bf16, as float64 values (exact)."""
    return (_bits(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _tol(ref, K):
    """float32 accumulation of K exact products: error up to ~K ulps of the largest partial sums."""
    return dict(rtol=0, atol=K * 2.0 ** -23 * (np.abs(ref).max() + 1.0) * 4)


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_matmul_equals_numpy_reference_of_the_same_rounding(transposed):
    rng = np.random.default_rng(0)
    N, C, OC = 5, 9, 6
    wide = rng.standard_normal((N, C + 3)).astype(np.float32)   # x is a column block of it (row stride C + 3)
    x = wide[:, 2:2 + C]
    w = rng.standard_normal((C, OC) if transposed else (OC, C)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    dout = rng.standard_normal((N, OC)).astype(np.float32)
    dx0, dw0, db0 = (rng.standard_normal(s).astype(np.float32) for s in ((N, C), w.shape, (OC,)))
    shadows = bf16.Shadows()
    d_x = gpu.to_device(wide)[:, 2:2 + C]
    d_w = gpu.to_device(w)
    out = gpu.to_device(rng.standard_normal((N, OC)).astype(np.float32))   # overwritten
    matmul.matmul_forward_bf16(out, d_x, d_w, gpu.to_device(b), transposed, shadows)
    W = _rounded(w) if transposed else _rounded(w).T                       # (C, OC)
    ref = _rounded(x) @ W + b
    np.testing.assert_allclose(gpu.to_host(out), ref, **_tol(ref, C))
    assert not np.allclose(gpu.to_host(out), x.astype(np.float64) @ (w if transposed else w.T) + b, rtol=0, atol=1e-5), \
        "the operands were not rounded to bf16"
    dx, dw, db = gpu.to_device(dx0), gpu.to_device(dw0), gpu.to_device(db0)
    matmul.matmul_backward_bf16(dx, dw, db, gpu.to_device(dout), d_x, d_w, transposed, shadows)
    G = _rounded(dout)
    ref_dx = dx0 + G @ W.T
    ref_dw = dw0 + (_rounded(x).T @ G if transposed else G.T @ _rounded(x))
    np.testing.assert_allclose(gpu.to_host(dx), ref_dx, **_tol(ref_dx, OC))
    np.testing.assert_allclose(gpu.to_host(dw), ref_dw, **_tol(ref_dw, N))
    np.testing.assert_allclose(gpu.to_host(db), db0 + dout.astype(np.float64).sum(0), rtol=1e-6, atol=1e-6)  # float32 dout


def test_gemm_refuses_mixed_operand_types():
    a = gpu.to_device(np.zeros((2, 3), np.uint16))
    with pytest.raises(TypeError, match="bf16"):
        matmul.gemm(False, False, a, gpu.to_device(np.zeros((3, 2), np.float32)), 0.0,
                    gpu.to_device(np.zeros((2, 2), np.float32)))


def test_weight_copies_are_rne_exact_and_follow_the_masters():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 6)) * 10.0 ** rng.integers(-30, 30, (4, 6))).astype(np.float32)
    w[0, :3] = np.array([0x3F808000, 0x3F818000, 0x7F7F8000], np.uint32).view(np.float32)   # ties, overflow to inf
    d_w = gpu.to_device(w)
    shadows = bf16.Shadows()
    copy = shadows.of(d_w)
    np.testing.assert_array_equal(gpu.to_host(copy), _bits(w))
    block = shadows.of(d_w[:, 1:4])                                # a column block is a weight of its own
    np.testing.assert_array_equal(gpu.to_host(block), _bits(w[:, 1:4]))
    gpu.copy_(d_w, -w)
    assert shadows.of(d_w) is copy
    np.testing.assert_array_equal(gpu.to_host(copy), _bits(w))   # same forward: the copy it already made
    shadows.stale()                                                  # the tape's reset: the masters may have moved
    np.testing.assert_array_equal(gpu.to_host(shadows.of(d_w)), _bits(-w))
    assert shadows.nbytes == 2 * (w.size + 4 * 3)


def test_operand_copy_of_a_column_block_is_rne_exact():
    x = np.random.default_rng(2).standard_normal((3, 10)).astype(np.float32)
    got = bf16.operand(gpu.to_device(x)[:, 3:8], 1)
    np.testing.assert_array_equal(gpu.to_host(got), _bits(x[:, 3:8]))


def test_bf16_is_cuda_and_float32_only():
    with pytest.raises(ValueError, match="CUDA"):
        Tape("cpu", precision="bf16")
    with pytest.raises(ValueError, match="float32"):
        Tape("cuda", np.float64, precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        Tape("cuda", precision="fp16")
    t = Tape("cuda", precision="bf16")
    assert t.precision == "bf16" and t.k.empty is gpu.empty        # other kernels are the device's own
    t.set_precision("fp32")
    assert t.precision == "fp32" and t.k is gpu


def test_bf16_gpt2_training_tracks_float32():
    """A few AdamW steps of a tiny GPT-2: bf16 losses within 2e-2 of the float32 run's, and falling."""
    cfg = GPT2Config(block_size=4, vocab_size=16, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (2, 4)).astype(np.int32)
    targets = np.roll(idx, -1, axis=1)
    losses = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        model = GPT2(cfg, device=device, seed=0)
        model.tape.set_precision(precision)
        opt = AdamW(model.params, lr=1e-2)
        losses[precision] = []
        for _ in range(3):
            _, loss = model(idx, targets)
            model.zero_grad()
            model.backward()
            opt.step()
            losses[precision].append(float(loss))
    bf, fp = np.array(losses["bf16"]), np.array(losses["fp32"])
    np.testing.assert_allclose(bf, fp, rtol=0, atol=2e-2)
    assert not np.allclose(bf, fp, rtol=0, atol=1e-6), "bf16 rounding changed nothing: the matmuls ran in float32"
    assert np.all(np.diff(bf) < 0), f"bf16 losses do not fall: {bf}"


def test_training_scripts_flag():
    """--precision (every script's loop flags): bf16 on the CPU stops with the reason."""
    import argparse

    from nt import train_utils
    p = argparse.ArgumentParser()
    train_utils.add_loop_args(p)
    assert p.parse_args([]).precision == "fp32"
    args = p.parse_args(["--precision", "bf16"])
    model = GPT2(GPT2Config(block_size=4, vocab_size=16, n_layer=1, n_head=2, n_embd=8), seed=0)
    with pytest.raises(SystemExit, match="CUDA"):
        train_utils.train(args, model, source=None)


def test_steady_bf16_step_allocates_no_device_memory(device_allocations):
    """Weight copies and operand buffers are made in the first steps, then reused."""
    cfg = GPT2Config(block_size=4, vocab_size=16, n_layer=1, n_head=2, n_embd=8)
    model = GPT2(cfg, device="cuda", seed=0)
    model.tape.set_precision("bf16")
    opt = AdamW(model.params, lr=1e-2)
    made = device_allocations
    rng = np.random.default_rng(1)
    for i in range(3):   # step 0 sizes the arenas, step 1 merges their segments: steady from step 2
        idx = rng.integers(0, cfg.vocab_size, (2, 4)).astype(np.int32)
        before = len(made)
        _, loss = model(idx, np.roll(idx, -1, axis=1))
        model.zero_grad()
        model.backward()
        opt.step()
        if i == 2:
            assert made[before:] == [], f"a steady bf16 step allocated device arrays: {made[before:]}"
    assert model.tape.k.shadows.nbytes == 2 * sum(model.params[n].size for n in ("wte", "qkvw", "attprojw", "fcw", "fcprojw"))


def test_weights_in_the_tapes_scratch_are_rounded_at_each_use():
    """A matrix dequantised into the tape's scratch (ops.linear_q's prefill) shares that
    memory with the next one: its bf16 copy must not be kept like a parameter's."""
    t = Tape("cuda", precision="bf16")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out = gpu.empty(3 * 5, np.float32).reshape(3, 5)
    for _ in range(2):   # two different matrices, one after the other, in the same scratch
        w = rng.standard_normal((5, 8)).astype(np.float32)
        scratch = t.work((5, 8))
        gpu.copy_(scratch, w)
        t.k.matmul_forward(out, gpu.to_device(x), scratch, gpu.empty(0, np.float32))
        ref = _rounded(x) @ _rounded(w).T
        np.testing.assert_allclose(gpu.to_host(out), ref, **_tol(ref, 8))
    assert t.k.shadows.nbytes == 0
