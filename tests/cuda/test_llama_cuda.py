"""A Llama-family step with every option on, and KV-cache generation, on the CUDA backend
match the CPU (float64): RMSNorm, QK-norm, RoPE, GQA, a sliding window, GeGLU, dropout
(the same counter-based masks), label smoothing, z-loss, multi-token prediction."""
import numpy as np
import pytest

from nt.models import Llama, LlamaConfig
from nt.optim import AdamW

TINY = dict(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=12, vocab_size=20, block_size=8,
            qkv_bias=True, qk_norm=True, post_norms=True, embed_scale=True, tie_embeddings=False,
            ffn_kind="geglu", sliding_window=2, global_every=2, rope_local_theta=100.0, n_predict=2,
            dropout=0.1, label_smoothing=0.1, z_loss=1e-3, init_std=0.3)
TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # dropout's hash under the simulator
def test_llama_step_matches_cpu():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 20, (2, 3)).astype(np.int32)
    targets = rng.integers(0, 20, (2, 3)).astype(np.int32)
    targets[0, -1] = -1
    runs = {}
    for device in ("cpu", "cuda"):
        model = Llama(LlamaConfig(**TINY), device=device, dtype=np.float64, seed=1)
        opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
        _, loss = model(idx, targets)
        model.zero_grad()
        model.backward()
        grads = np.array(model.tape.k.to_host(model.params.grad))
        opt.step()
        runs[device] = loss, grads, np.array(model.tape.k.to_host(model.params.flat))
    for want, got in zip(runs["cpu"], runs["cuda"]):
        np.testing.assert_allclose(got, want, **TOL)


def test_llama_kv_cache_generation_matches_cpu():
    cfg = LlamaConfig(**dict(TINY, dropout=0.0, n_predict=1))
    prompt = np.array([3, 7, 1], dtype=np.int32)
    out = {device: Llama(cfg, device=device, dtype=np.float64, seed=2).generate(prompt, 3, temperature=0)
           for device in ("cpu", "cuda")}
    np.testing.assert_array_equal(out["cuda"], out["cpu"])


@pytest.mark.parametrize("adapt", [False, True])
def test_frozen_and_lora_steps_match_cpu(adapt):
    """A partly frozen model (norms and qk-norm frozen: their weight grads skipped), or a
    fully frozen one with LoRA adapters on every linear, gives the CPU's grads."""
    from nt.lora import LoRA
    cfg = LlamaConfig(**dict(TINY, dropout=0.0, n_predict=1))
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 20, (2, 3)).astype(np.int32)
    targets = np.roll(idx, -1, axis=1)
    runs = {}
    for device in ("cpu", "cuda"):
        model = Llama(cfg, device=device, dtype=np.float64, seed=1)
        if adapt:
            lora = LoRA(model, rank=2, alpha=4, targets=["q", "v", "o", "gate", "down"], seed=0)
            lora.params.k.copy_(lora.params.flat, lora.params.k.to_device(
                np.random.default_rng(4).standard_normal(lora.params.size) * 0.1))
        else:
            model.freeze(["qkvw", "gate_up", "down", "wte"])
        model(idx, targets)
        model.zero_grad()
        model.backward()
        runs[device] = np.array(model.tape.k.to_host(model.trainable_params.grad))
    assert np.abs(runs["cpu"]).max() > 1e-3
    np.testing.assert_allclose(runs["cuda"], runs["cpu"], **TOL)
