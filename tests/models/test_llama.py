import numpy as np
import pytest

from nt.models import Llama, LlamaConfig
from nt.models.llama import multi_token_targets, param_layout
from nt.optim import AdamW

# every option on: GQA, qkv bias, qk-norm, post-norms, embedding scale, untied head,
# GeGLU, a sliding-window local layer then a global one, multi-token prediction
FULL = dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=24, vocab_size=40, block_size=16,
            qkv_bias=True, qk_norm=True, post_norms=True, embed_scale=True, tie_embeddings=False,
            ffn_kind="geglu", sliding_window=3, global_every=2, rope_local_theta=100.0, n_predict=2,
            init_std=0.3)


def batch(V, B=2, T=6, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    targets[0, -1] = -1
    return idx, targets


@pytest.mark.parametrize("overrides", [
    FULL,
    dict(FULL, norm="layernorm", rope_pairing="interleaved", ffn_kind="swiglu", tie_embeddings=True, n_predict=1,
         rope_scaling=(4.0, 1.0, 2.0, 8)),
    dict(FULL, dropout=0.3, label_smoothing=0.1, z_loss=1e-3, n_predict=3),
])
def test_llama_gradients_match_finite_differences(overrides):
    model = Llama(LlamaConfig(**overrides), dtype=np.float64, seed=1)
    idx, targets = batch(model.config.vocab_size)

    def loss() -> float:
        model.tape.step = 0  # the same dropout masks in every forward
        return model(idx, targets)[1]
    loss()
    model.zero_grad()
    model.backward()
    analytic = model.params.grad.copy()
    flat = model.params.flat
    rng = np.random.default_rng(2)
    # a random subset of every parameter tensor (padded vocabulary rows have zero grad)
    picks = []
    for name, t in model.params.items():
        rows = t.size if name not in ("wte", "lm_head") else model.config.vocab_size * model.config.dim
        picks += list(t.offset + rng.choice(rows, min(4, rows), replace=False))
    h = 1e-6
    for i in picks:
        old = flat[i]
        flat[i] = old + h
        plus = loss()
        flat[i] = old - h
        minus = loss()
        flat[i] = old
        np.testing.assert_allclose(analytic[i], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-9)


def test_llama_overfits_a_fixed_batch():
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=64, n_layers=1, dim=32, ffn_hidden=64)
    model = Llama(cfg, seed=0)
    idx, targets = batch(64, B=4, T=16, seed=3)
    opt = AdamW(model.params, lr=1e-2)
    losses = []
    for _ in range(60):
        _, loss = model(idx, targets)
        losses.append(loss)
        model.zero_grad()
        model.backward()
        opt.step()
    assert losses[0] > 3.5 and losses[-1] < 0.3 * losses[0], losses[::10]


def test_llama_is_causal_and_handles_one_token():
    model = Llama(LlamaConfig(**dict(FULL, n_predict=1)), dtype=np.float64)
    idx, _ = batch(40, B=1, T=6)
    full = model(idx)[0].copy()
    changed = idx.copy()
    changed[0, 4:] = (changed[0, 4:] + 1) % 40
    np.testing.assert_allclose(model(changed)[0][:, :4], full[:, :4], rtol=1e-12)
    np.testing.assert_allclose(model(idx[:, :1])[0], full[:, :1], rtol=1e-12)  # T = 1


def test_llama_dropout_only_in_training_mode():
    model = Llama(LlamaConfig.preset("llama-tiny", dropout=0.5), dtype=np.float64)
    idx, targets = batch(256)
    train_losses = {model(idx, targets)[1] for _ in range(2)}
    assert len(train_losses) == 2                       # a new mask each training step
    model.eval()
    assert not model.training
    eval_losses = {model(idx, targets)[1] for _ in range(2)}
    assert len(eval_losses) == 1
    model.train()
    assert model.training


def test_llama_steady_state_allocates_nothing():
    model = Llama(LlamaConfig.preset("llama-tiny", n_predict=2, dropout=0.1))
    idx, targets = batch(256)
    for step in range(2):
        model.forward(idx, targets)
        model.zero_grad()
        model.backward()
        if step == 0:
            grows = (model.tape.acts.grows, model.tape.saved.grows)
    assert (model.tape.acts.grows, model.tape.saved.grows) == grows


def test_multi_token_targets_shift_and_ignore():
    targets = np.array([[1, 2, 3, 4]], dtype=np.int32)
    np.testing.assert_array_equal(multi_token_targets(targets, 0), targets)
    np.testing.assert_array_equal(multi_token_targets(targets, 2), [[3, 4, -1, -1]])
    np.testing.assert_array_equal(multi_token_targets(targets, 9), [[-1, -1, -1, -1]])


# published parameter counts (embeddings tied in all five)
PUBLISHED = {"smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "qwen2-0.5b": 494.0e6,
             "llama3.2-1b": 1235.8e6, "gemma3-270m": 268.1e6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(name):
    cfg = LlamaConfig.preset(name)
    n = sum(int(np.prod(shape)) for _, shape, _ in param_layout(cfg))
    n -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.dim  # our padding rows
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 1e-3


def test_llama_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divide"):
        LlamaConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="ffn_kind"):
        LlamaConfig(ffn_kind="relu")
    with pytest.raises(ValueError, match="unknown Llama preset"):
        LlamaConfig.preset("llama-huge")
    model = Llama(LlamaConfig.preset("llama-tiny"))
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, 65), dtype=np.int32))
    with pytest.raises(ValueError, match="outside"):
        model(np.full((1, 4), 256, dtype=np.int32))


@pytest.mark.parametrize("overrides", [dict(FULL, n_predict=1, block_size=12), dict(FULL, n_predict=1, block_size=7)])
def test_llama_generation_with_kv_cache_matches_full_recompute(overrides):
    """Greedy decoding with the KV cache (one token per step through attention's q0 rows)
    picks the same tokens as recomputing the whole context each step, while the context
    fits; block_size=7 also exercises a cache refill (the outputs may then differ)."""
    model = Llama(LlamaConfig(**overrides), dtype=np.float64, seed=3)
    prompt = np.array([1, 5, 9], dtype=np.int32)
    cached = model.generate(prompt, 8, temperature=0)
    model.use_kv_cache = False
    full = model.generate(prompt, 8, temperature=0)
    n = model.config.block_size - prompt.size + 1   # tokens sampled while the context fits
    np.testing.assert_array_equal(cached[:prompt.size + n], full[:prompt.size + n])
    assert cached.shape == (11,) and cached.max() < 40
