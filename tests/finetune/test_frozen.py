"""Frozen parameters: no grad memory, no weight-gradient work, never touched by an optimizer,
and the trainable ones still one flat buffer with exactly the grads a full backward gives them."""
import numpy as np
import pytest

import nt
from helpers import measure_step_allocations
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.optim import AdamW, clip_factor

GPT = GPT2Config.preset("tiny", vocab_size=64, block_size=16, n_embd=32)
LLAMA = LlamaConfig.preset("llama-tiny", vocab_size=64, qk_norm=True, post_norms=True, qkv_bias=True)


def batch(seed=0, B=2, T=8, V=64):
    idx = np.random.default_rng(seed).integers(0, V, (B, T), dtype=np.int32)
    return idx, np.roll(idx, -1, axis=1)


def grads(model, idx, targets) -> dict:
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    return {n: np.array(t.grad) for n, t in model.params.items() if t.grad is not None}


@pytest.mark.parametrize("make, trainable", [
    (lambda: GPT2(GPT, dtype=np.float64), ["ln1w", "lnfb", "fcb", "wpe"]),
    (lambda: Llama(LLAMA, dtype=np.float64), ["attn_norm", "q_norm", "qkvb", "down"]),
])
def test_trainable_subset_gets_the_full_backward_grads(make, trainable):
    full, part = make(), make().freeze(trainable)
    idx, targets = batch()
    want, got = grads(full, idx, targets), grads(part, idx, targets)
    assert sorted(got) == sorted(trainable) and part.params.trainable == [n for n in full.params if n in trainable]
    for name in trainable:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)
    assert part.params.size == sum(part.params[n].size for n in trainable)   # flat/grad: trainable only
    assert part.params.grad.shape == (part.params.size,)
    assert part.params.frozen.gbuf is None                                  # no grad memory for the rest
    frozen = [n for n in part.params if n not in trainable]
    assert all(part.params[n].grad is None for n in frozen)
    np.testing.assert_array_equal(part.params.to_flat(), full.params.to_flat())  # same values, canonical order


def test_frozen_weights_run_only_the_input_gradient_gemm(monkeypatch):
    model = GPT2(GPT).freeze(["lnfw"])
    k = nt.backend("cpu")
    wanted = []
    real = k.matmul_backward
    monkeypatch.setattr(k, "matmul_backward", lambda dx, dw, db, *a: (wanted.append((dw.shape[0], db.shape[0])),
                                                                        real(dx, dw, db, *a)))
    model.forward(*batch())
    model.backward()
    assert wanted and all(w == (0, 0) for w in wanted)   # every linear skipped dW and dbias


def test_optimizer_never_touches_frozen_parameters_and_steps_allocate_nothing(monkeypatch):
    model = GPT2(GPT, seed=1).freeze(["wte", "lnfw", "lnfb"])
    before = {n: t.data.copy() for n, t in model.params.items()}
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
    assert opt.m.shape == (model.params.size,)          # optimizer memory: trainable only
    idx, targets = batch()

    def step():
        model.forward(idx, targets)
        model.zero_grad()
        model.backward()
        _, clip = clip_factor(model.params, 1.0)
        opt.step(grad_scale=clip)
    for _ in range(3):
        step()
    for name, t in model.params.items():
        changed = not np.array_equal(t.data, before[name])
        assert changed == (name in ("wte", "lnfw", "lnfb")), name
    array_args, nrt_allocs, _ = measure_step_allocations(monkeypatch, model.tape.k, step)
    assert nrt_allocs == array_args, "a kernel allocated memory in a steady frozen step"


def test_whole_model_frozen_and_unfrozen():
    model = GPT2(GPT).freeze()
    assert model.params.size == 0 and model.num_params == model.params.numel > 0
    model.forward(*batch())
    model.backward()                                      # runs, writes no parameter grad
    with pytest.raises(ValueError, match="no trainable parameters"):
        AdamW(model.params)
    model.unfreeze()
    assert model.params.size == model.num_params


def test_freezing_releases_the_old_grads_first():
    """with_trainable frees the replaced Params' grad buffer (LoRA's build peak), and the
    replaced Params then has no grads at all rather than dangling ones."""
    model = GPT2(GPT)
    old = model.params
    assert old.arena.gbuf.shape[0] == old.size
    model.freeze(["wte"])
    assert old.arena.gbuf is None and all(t.grad is None for _, t in old.items())
    assert model.params["wte"].grad is not None and model.params["wpe"].grad is None


def test_freeze_refuses_unknown_names():
    with pytest.raises(ValueError, match="no parameters named \\['nope'\\]"):
        GPT2(GPT).freeze(["nope"])
