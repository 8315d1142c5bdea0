"""LoRA: the fused adapter op against NumPy and finite differences, adapters on GPT-2 and
Llama, merge/unmerge, save/load with PEFT's names, a steady step allocating nothing."""
import json

import numpy as np
import pytest

from helpers import check_grads, measure_step_allocations, run_op
from nt import ops
from nt.io import load_safetensors
from nt.lora import LoRA, targets_of
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.optim import AdamW

GPT = GPT2Config.preset("tiny", vocab_size=64, block_size=16, n_embd=32)
LLAMA = LlamaConfig.preset("llama-tiny", vocab_size=64)


def batch(seed=0, B=2, T=8, V=64):
    idx = np.random.default_rng(seed).integers(0, V, (B, T), dtype=np.int32)
    return idx, np.roll(idx, -1, axis=1)


def loss_of(model, idx, targets) -> float:
    """The forward's loss; in training mode an adapted model forms no logits (its
    classifier is frozen, see ops.classifier_xent), so model(idx, targets) has none to give."""
    return float(model.forward(idx, targets)[1].numpy()[0])


ONE = np.array([[3, 4]], dtype=np.int64)           # one adapter: output columns 3..6 of 9
TWO = np.array([[0, 3], [5, 4]], dtype=np.int64)   # a group of two on one input: columns 0..2 and 5..8


def lora_linear(t, p, parts=ONE):
    out = ops.linear(t, p["x"], p["W"], p["b"])
    return ops.lora_(t, out, p["x"], p["A"], p["B"], 0.7, parts)


def lora_arrays(rng, T, parts, r=2):
    return {"x": rng.standard_normal((2, T, 6)), "W": rng.standard_normal((9, 6)), "b": rng.standard_normal(9),
            "A": rng.standard_normal((len(parts) * r, 6)), "B": rng.standard_normal((int(parts[:, 1].sum()), r))}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", [ONE, TWO])
def test_lora_op_matches_numpy(dtype, parts):
    arrays = lora_arrays(np.random.default_rng(0), 3, parts)
    _, _, out = run_op(lambda t, p: lora_linear(t, p, parts), arrays, dtype)
    ref = arrays["x"] @ arrays["W"].T + arrays["b"]
    b0 = 0
    for g, (o0, rows) in enumerate(parts):   # each adapter on its own, as PEFT runs them
        A, B = arrays["A"][2 * g:2 * g + 2], arrays["B"][b0:b0 + rows]
        ref[..., o0:o0 + rows] += 0.7 * arrays["x"] @ A.T @ B.T
        b0 += rows
    np.testing.assert_allclose(out.data, ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("parts", [ONE, TWO])
def test_lora_op_gradients(T, parts):
    check_grads(lambda t, p: lora_linear(t, p, parts), lora_arrays(np.random.default_rng(1), T, parts))


def test_lora_op_with_frozen_base_weight_gives_x_A_B_grads_and_none_to_w():
    """The base weight frozen (as LoRA runs it): x, A and B get exact grads, W none."""
    from nt import Params, Tape
    rng = np.random.default_rng(2)
    arrays = {"x": rng.standard_normal((3, 6)), "W": rng.standard_normal((5, 6)), "A": rng.standard_normal((2, 6)),
              "B": rng.standard_normal((5, 2))}
    p = Params("cpu", np.float64, [(n, a.shape, False) for n, a in arrays.items()], trainable=["x", "A", "B"])
    for n, a in arrays.items():
        p[n].data[...] = a
    t = Tape("cpu", np.float64)
    out = ops.lora_(t, ops.linear(t, p["x"], p["W"]), p["x"], p["A"], p["B"], 2.0, np.array([[0, 5]]))
    dout = rng.standard_normal(out.shape)
    t.backward(out, dout)
    x, W, A, B = (arrays[n] for n in "xWAB")
    h = x @ A.T
    np.testing.assert_allclose(p["B"].grad, 2.0 * dout.T @ h, rtol=1e-12)
    np.testing.assert_allclose(p["A"].grad, (2.0 * dout @ B).T @ x, rtol=1e-12)
    np.testing.assert_allclose(p["x"].grad, dout @ W + (2.0 * dout @ B) @ A, rtol=1e-12)
    assert p["W"].grad is None


def test_lora_op_refuses_bad_shapes():
    arrays = lora_arrays(np.random.default_rng(3), 3, ONE)
    with pytest.raises(ValueError, match="outside the output"):
        run_op(lambda t, p: lora_linear(t, p, np.array([[6, 4]])), arrays)
    with pytest.raises(ValueError, match="do not stack"):
        run_op(lambda t, p: lora_linear(t, p, TWO), arrays)
    with pytest.raises(ValueError, match="int64"):
        run_op(lambda t, p: lora_linear(t, p, np.array([3, 4])), arrays)
    arrays["B"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match="do not stack"):
        run_op(lambda t, p: lora_linear(t, p), arrays)


MODELS = [(lambda: GPT2(GPT, dtype=np.float64), ["qkv", "o", "fc", "proj"]),
          (lambda: Llama(LLAMA, dtype=np.float64), ["q", "k", "v", "o", "gate", "up", "down"])]


@pytest.mark.parametrize("make, targets", MODELS)
def test_adapters_train_only_themselves_and_start_as_identity(make, targets):
    model = make()
    idx, targets_ = batch()
    before = model(idx)[0].copy()
    base = model.params.to_flat()
    lora = LoRA(model, rank=4, alpha=8, targets=targets, dropout=0.1)
    np.testing.assert_array_equal(model(idx)[0], before)                   # B = 0: the identity at first
    assert model.params.size == 0 and model.trainable_params is lora.params
    opt = AdamW(lora.params, lr=1e-2)
    losses = []
    for _ in range(8):
        model.zero_grad()
        losses.append(loss_of(model, idx, targets_))
        model.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05
    np.testing.assert_array_equal(model.params.to_flat(), base)    # the base is bitwise unchanged


@pytest.mark.parametrize("make, targets", MODELS)
def test_adapter_gradients_match_finite_differences(make, targets):
    model = make()
    lora = LoRA(model, rank=2, alpha=3, targets=targets, seed=1)
    rng = np.random.default_rng(4)
    flat = lora.params.flat
    flat[:] = rng.standard_normal(flat.size) * 0.1                 # B != 0 so every path carries grad
    idx, tgt = batch(T=5)
    model.zero_grad()
    model.forward(idx, tgt)
    model.backward()
    analytic = lora.params.grad.copy()
    for i in rng.choice(flat.size, 40, replace=False):
        old = flat[i]
        flat[i] = old + 1e-6
        plus = loss_of(model, idx, tgt)
        flat[i] = old - 1e-6
        minus = loss_of(model, idx, tgt)
        flat[i] = old
        assert analytic[i] == pytest.approx((plus - minus) / 2e-6, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("make, targets", MODELS)
def test_merge_equals_adapters_and_unmerge_is_bitwise(make, targets):
    model = make()
    lora = LoRA(model, rank=4, alpha=8, targets=targets)
    lora.params.flat[:] = np.random.default_rng(5).standard_normal(lora.params.size) * 0.05
    idx, _ = batch()
    with_adapters = model(idx)[0].copy()
    base = model.params.to_flat()
    lora.merge()
    np.testing.assert_allclose(model(idx)[0], with_adapters, rtol=1e-10, atol=1e-10)
    assert not np.array_equal(model.params.to_flat(), base)
    lora.unmerge()
    np.testing.assert_array_equal(model.params.to_flat(), base)
    with lora.disabled():
        plain = model(idx)[0].copy()
    lora.detach()
    np.testing.assert_array_equal(model(idx)[0], plain)


def test_merge_in_float32_within_1e5():
    model = Llama(LLAMA)
    lora = LoRA(model, rank=8, alpha=16, targets=["q", "v", "down"])
    lora.params.flat[:] = np.random.default_rng(6).standard_normal(lora.params.size).astype(np.float32) * 0.05
    idx, _ = batch()
    with_adapters = model(idx)[0].copy()
    lora.merge()
    np.testing.assert_allclose(model(idx)[0], with_adapters, atol=1e-5)


@pytest.mark.parametrize("make, targets", MODELS)
def test_save_and_load_with_peft_names(make, targets, tmp_path):
    model = make()
    lora = LoRA(model, rank=4, alpha=8, targets=targets[:2])
    lora.params.flat[:] = np.random.default_rng(7).standard_normal(lora.params.size) * 0.05
    idx, _ = batch()
    want = model(idx)[0].copy()
    lora.save(tmp_path / "adapter")
    tensors, _ = load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    C = model.params["qkvw"].shape[2]
    if isinstance(model, GPT2):   # PEFT's names on transformers' GPT2LMHeadModel (Conv1D: fan_in_fan_out)
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, C)
        assert tensors["base_model.model.transformer.h.1.attn.c_proj.lora_B.weight"].shape == (C, 4)
        assert config["target_modules"] == ["attn.c_attn", "attn.c_proj"] and config["fan_in_fan_out"]
    else:                         # ... and on LlamaForCausalLM
        kv = LLAMA.n_kv_heads * LLAMA.hs
        assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, C)
        assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (kv, 4)
        assert config["target_modules"] == ["k_proj", "q_proj"] and not config["fan_in_fan_out"]
    assert len(tensors) == 2 * 2 * model.params["qkvw"].shape[0]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")

    fresh = make()
    LoRA.load(tmp_path / "adapter", fresh)
    np.testing.assert_array_equal(fresh(idx)[0], want)


def test_bad_lora_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"match no layer .* choose from"):
        LoRA(GPT2(GPT), 4, 8, ["q"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRA(Llama(LLAMA), 0, 8, ["q"])
    with pytest.raises(ValueError, match="alpha"):
        LoRA(Llama(LLAMA), 4, float("nan"), ["q"])
    model = Llama(LLAMA)
    LoRA(model, 2, 4, ["q"])
    with pytest.raises(ValueError, match="already has adapters"):
        LoRA(model, 2, 4, ["v"])
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(Exception, match="not a LoRA adapter config"):
        LoRA.load(tmp_path, Llama(LLAMA))


def test_lora_step_allocates_nothing(monkeypatch):
    model = Llama(LlamaConfig.preset("llama-tiny", vocab_size=64), seed=0)
    lora = LoRA(model, rank=4, alpha=8, targets=list(targets_of(model)), dropout=0.1)
    opt = AdamW(lora.params, lr=1e-3)
    idx, tgt = batch()

    def step():
        model.forward(idx, tgt)
        model.zero_grad()
        model.backward()
        opt.step()
    step()
    step()
    grows = model.tape.acts.grows
    array_args, nrt_allocs, _ = measure_step_allocations(monkeypatch, model.tape.k, step)
    assert model.tape.acts.grows == grows
    assert nrt_allocs == array_args, "a kernel allocated memory in a steady LoRA step"


def test_lora_dropout_draws_fresh_masks_each_training_step():
    """GPT-2 has no dropout of its own, but its LoRA adapters do: two training forwards of
    the same batch must differ (the tape's dropout step advances), eval forwards must not."""
    for make in (lambda: GPT2(GPT), lambda: Llama(LLAMA)):
        model = make()
        lora = LoRA(model, rank=4, alpha=8, targets=list(targets_of(model))[:2], dropout=0.5)
        lora.params.flat[:] = np.random.default_rng(8).standard_normal(lora.params.size).astype(np.float32)
        idx, tgt = batch()
        first, second = loss_of(model, idx, tgt), loss_of(model, idx, tgt)
        assert first != second
        model.eval()
        assert loss_of(model, idx, tgt) == loss_of(model, idx, tgt)
