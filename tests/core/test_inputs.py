"""Integer inputs and generation settings: checked before any cast, owned by the tape,
refused with a message instead of silently giving a different result."""
import numpy as np
import pytest

import nt
from nt import ops
from nt.data import DataLoader
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.profile import Profiler

CFG = GPT2Config.preset("tiny", vocab_size=100, block_size=16, n_embd=32)  # padded to 128


def batch(seed=0, B=2, T=8):
    idx = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T), dtype=np.int32)
    return idx, np.roll(idx, -1, axis=1)


def grads_after(model, idx, targets, reuse: bool) -> np.ndarray:
    model.zero_grad()
    model.forward(idx, targets)
    if reuse:  # the caller overwrites its arrays before the backward, as DataLoader does
        idx[:] = 0
        targets[:] = 1
    model.backward()
    return model.params.grad.copy()


def test_backward_reads_the_tape_copy_of_ids_and_targets():
    model = GPT2(CFG, dtype=np.float64)
    idx, targets = batch()
    clean = grads_after(model, idx.copy(), targets.copy(), reuse=False)
    reused = grads_after(model, idx.copy(), targets.copy(), reuse=True)
    np.testing.assert_array_equal(clean, reused)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_ids_are_range_checked_before_any_cast(dtype):
    model = GPT2(CFG)
    idx, targets = batch()
    wrapped = idx.astype(dtype)
    wrapped[0, 0] = 2 ** 32 + 5          # would run as id 5 after a cast to int32
    with pytest.raises(ValueError, match=r"idx holds 4294967301 at index \(0, 0\)"):
        model(wrapped, targets)
    bad_targets = targets.astype(dtype)
    bad_targets[1, 2] = 2 ** 32 - 1      # would become -1 (ignored) after a cast
    with pytest.raises(ValueError, match="targets holds 4294967295"):
        model(idx, bad_targets)
    with pytest.raises(ValueError, match="outside"):   # the op itself checks before casting too
        ops.embedding(model.tape, wrapped, model.params["wte"])


def test_padded_vocabulary_rows_are_not_tokens():
    model = GPT2(CFG)
    idx, targets = batch()
    idx[0, 3] = CFG.vocab_size           # a row of wte exists (padded to 128), but no token
    with pytest.raises(ValueError, match=r"idx holds 100 .* outside \[0, 100\)"):
        model(idx, targets)
    with pytest.raises(ValueError, match="prompt holds 100"):
        model.generate(np.array([1, 2, 100]), 2)
    idx, targets = batch()
    targets[1, 1] = 120
    with pytest.raises(ValueError, match="targets holds 120"):
        model(idx, targets)


def test_generate_refuses_bad_settings():
    model = GPT2(CFG)
    prompt = np.array([1, 2, 3])
    for kwargs, match in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
                          (dict(max_new_tokens=2, top_k=0), "top_k"), (dict(max_new_tokens=2, top_k=-3), "top_k"),
                          (dict(max_new_tokens=2, temperature=float("nan")), "temperature"),
                          (dict(max_new_tokens=2, temperature=-1), "temperature"),
                          (dict(max_new_tokens=2, top_p=0.0), "top_p")]:
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, **kwargs)
    assert model.generate(prompt, 0).tolist() == [1, 2, 3]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_raise_instead_of_sampling(temperature):
    model = Llama(LlamaConfig.preset("llama-tiny", vocab_size=64))
    model.params["norm_f"].data[:] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        model.generate(np.array([1, 2]), 3, temperature=temperature)


def test_data_loader_refuses_negative_and_oversized_tokens():
    tokens = np.arange(200, dtype=np.int64) % 50
    tokens[17] = -3
    with pytest.raises(ValueError, match="token id -3 at index 17"):
        DataLoader(tokens, 2, 8)
    tokens[17] = 2 ** 32 + 1
    with pytest.raises(ValueError, match="token id 4294967297 at index 17"):
        DataLoader(tokens, 2, 8)
    tokens[17] = 50
    with pytest.raises(ValueError, match="outside \\[0, 50\\)"):
        DataLoader(tokens, 2, 8, vocab_size=50)


def test_profiler_times_the_kv_cache_and_the_loss_scaler():
    """One owner of the kernel modules: the KV cache and GradScaler are timed too."""
    model = GPT2(CFG)
    scaler = nt.optim.GradScaler(model.params)
    idx, targets = batch()
    with Profiler(model) as prof:
        model.generate(np.array([1, 2]), 3)
        model.forward(idx, targets)
        scaler.backward(model.tape, model.loss)
        scaler.unscale_()
    assert "unscale_check_" in prof.stats and "attention_forward" in prof.stats
    assert model.tape.k is nt.backend("cpu") and scaler.k is nt.backend("cpu")


def test_cpu_backend_synchronize_is_a_no_op():
    assert nt.backend("cpu").synchronize() is None  # the CUDA twin is checked in tests/cuda
