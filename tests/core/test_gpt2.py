import numpy as np
import pytest

import reference_gpt2 as ref
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW

CFG = GPT2Config(block_size=8, vocab_size=70, n_layer=2, n_head=2, n_embd=16)  # Vp = 128 > V


def batch(B=2, T=8, V=70, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, T)).astype(np.int32)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    y[0, 2] = -1  # an ignored position
    return x, y


def as_dict(model):
    return {name: t.data.astype(np.float64).copy() for name, t in model.params.items()}


def test_presets_and_padding():
    assert GPT2Config.preset("d12").padded_vocab_size == 50304
    d12 = GPT2(GPT2Config.preset("d12", block_size=1024), seed=None)
    assert d12.num_params == 124475904  # llm.c's count, with the padded vocabulary
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.preset("d13")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=10, n_head=3)


def test_init_follows_gpt2():
    model = GPT2(GPT2Config.preset("tiny", vocab_size=100, n_layer=4), seed=0)
    p = model.params
    assert np.all(p["ln1w"].data == 1) and np.all(p["qkvb"].data == 0)
    assert abs(p["qkvw"].data.std() - 0.02) < 0.002
    assert abs(p["fcprojw"].data.std() - 0.02 / np.sqrt(8)) < 0.001
    assert np.all(p["wte"].data[100:] == 0)  # padded rows


def test_forward_and_grads_match_numpy_reference():
    model = GPT2(CFG, dtype=np.float64, seed=1)
    x, y = batch()
    logits, loss = model(x, y)
    model.zero_grad()
    model.backward()
    ref_loss, ref_grads = ref.forward_backward(as_dict(model), x, y, CFG.n_layer, CFG.n_head, CFG.vocab_size)
    assert abs(loss - ref_loss) < 1e-12
    for name, t in model.params.items():
        np.testing.assert_allclose(t.grad, ref_grads[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_whole_model_finite_differences():
    model = GPT2(CFG, dtype=np.float64, seed=2)
    x, y = batch(seed=3)
    model(x, y)
    model.zero_grad()
    model.backward()
    grad = model.params.grad.copy()
    flat = model.params.flat
    rng = np.random.default_rng(4)
    # every tensor gets a few checked elements
    indices = np.concatenate([t.offset + rng.choice(t.size, 4, replace=False) for t in model.params.tensors.values()])
    for i in indices:
        old = flat[i]
        flat[i] = old + 1e-6
        plus = model(x, y)[1]
        flat[i] = old - 1e-6
        minus = model(x, y)[1]
        flat[i] = old
        assert abs((plus - minus) / 2e-6 - grad[i]) <= 1e-7 + 1e-6 * abs(grad[i]), i


def train_nt(dtype, steps=10):
    model = GPT2(CFG, dtype=dtype, seed=5)
    opt = AdamW(model.params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x, y = batch(seed=6)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        model.zero_grad()
        model.backward()
        opt.step()
        losses.append(loss)
    return np.array(losses), as_dict(model)


def train_reference(steps=10):
    model = GPT2(CFG, dtype=np.float64, seed=5)
    P = as_dict(model)
    M = {k: np.zeros_like(v) for k, v in P.items()}
    Vs = {k: np.zeros_like(v) for k, v in P.items()}
    x, y = batch(seed=6)
    losses = []
    for step in range(1, steps + 1):
        loss, G = ref.forward_backward(P, x, y, CFG.n_layer, CFG.n_head, CFG.vocab_size)
        ref.adamw(P, G, M, Vs, step, 1e-2, 0.9, 0.95, 1e-8, 0.1, model.params.decay)
        losses.append(loss)
    return np.array(losses), P


def test_ten_adamw_steps_match_numpy_reference():
    ref_losses, ref_params = train_reference()
    losses64, params64 = train_nt(np.float64)
    np.testing.assert_allclose(losses64, ref_losses, rtol=0, atol=1e-8)
    for name in ref_params:
        np.testing.assert_allclose(params64[name], ref_params[name], rtol=0, atol=1e-8, err_msg=name)
    losses32, _ = train_nt(np.float32)
    np.testing.assert_allclose(losses32, ref_losses, rtol=0, atol=1e-3)


def test_tiny_model_overfits_a_batch():
    model = GPT2(GPT2Config.preset("tiny", vocab_size=64, block_size=16), seed=0)
    opt = AdamW(model.params, lr=3e-3, betas=(0.9, 0.95))
    x = np.random.default_rng(7).integers(0, 64, (4, 16)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = loss if first is None else first
        model.zero_grad()
        model.backward()
        opt.step()
    assert loss < 0.1 * first, (first, loss)


def test_bad_input_is_rejected_before_any_kernel():
    model = GPT2(CFG, seed=0)
    x, y = batch()
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, 9), np.int32))
    with pytest.raises(ValueError, match="outside"):
        model(x + 70)
    with pytest.raises(ValueError, match="outside"):
        model(x, y - 5)
    with pytest.raises(ValueError, match="same shape"):
        model(x, y[:, :4])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(x[0])
    with pytest.raises(TypeError, match="integers"):
        model(x.astype(np.float32))
    with pytest.raises(RuntimeError, match="targets"):
        GPT2(CFG, seed=0).backward()


def test_generate_is_seeded_and_greedy_is_argmax():
    model = GPT2(CFG, seed=0)
    a = model.generate(np.array([1, 2, 3]), 5, temperature=1.0, top_k=10, seed=9)
    b = model.generate(np.array([1, 2, 3]), 5, temperature=1.0, top_k=10, seed=9)
    assert np.array_equal(a, b) and a.shape == (8,) and a.max() < CFG.vocab_size
    g = model.generate(np.array([1, 2, 3]), 1, temperature=0)
    logits, _ = model(np.array([[1, 2, 3]], np.int32))
    assert g[-1] == np.argmax(logits[0, -1])
