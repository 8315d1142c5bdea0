"""generate() sampling options, GGUF models with tokenizers, quantised (Q8_0 / Q4_0) decoding."""
import numpy as np
import pytest

import nt
from nt import ops
from nt.io import gguf
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.models.base import sample_logits

from .tiny_vocab import sp_metadata


def _llama(vocab_size=274, **kw):
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=vocab_size, rope_pairing="interleaved", **kw)
    return Llama(cfg, seed=1)


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    seen = {sample_logits(logits, 1.0, None, rng, top_p=0.75) for _ in range(300)}
    assert seen == {0, 1}          # 0.5 < 0.75 <= 0.5 + 0.3
    seen = {sample_logits(logits, 1.0, None, rng, top_p=0.5) for _ in range(100)}
    assert seen == {0}
    seen = {sample_logits(logits, 1.0, None, rng, top_p=1.0) for _ in range(600)}
    assert seen == {0, 1, 2, 3}


def test_generate_seed_stop_and_streaming():
    model = _llama(vocab_size=256)
    prompt = np.array([1, 2, 3], np.int32)
    a = model.generate(prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = model.generate(prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert np.array_equal(a, b)
    streamed = []
    greedy = model.generate(prompt, 10, temperature=0, on_token=streamed.append)
    assert streamed == list(greedy[3:])
    stop_at = int(greedy[5])
    stopped = model.generate(prompt, 10, temperature=0, stop=[stop_at])
    assert list(stopped) == list(greedy[:list(greedy[3:]).index(stop_at) + 4])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(prompt, 2, stop=["x"])
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=0.0)


@pytest.mark.parametrize("n_new", [6, 30])   # 30: the cache (block_size 16) overflows and re-prefills
def test_gpt2_generation_with_kv_cache_matches_full_recompute(n_new):
    model = GPT2(GPT2Config(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    prompt = np.array([1, 2, 3], np.int32)
    cached = model.generate(prompt, n_new, temperature=0)
    model.use_kv_cache = False
    full = model.generate(prompt, n_new, temperature=0)
    if n_new == 6:
        assert np.array_equal(cached, full)
        for i in range(3, 9):   # and greedy = argmax of a full forward over the prefix
            logits, _ = model(full[None, :i])
            assert full[i] == int(np.argmax(logits[0, -1]))
    else:  # identical until the cache is full; after that the cache keeps half the context
        assert np.array_equal(cached[:16], full[:16]) and len(cached) == len(full) == 33


def _tiny_gguf(tmp_path, dtype, tie=True):
    model = _llama(tie_embeddings=tie)
    path = tmp_path / f"m_{dtype}.gguf"
    nt.models.gguf.write(path, model, dtype, metadata=sp_metadata())
    return path


def test_from_gguf_attaches_tokenizer_and_stops_at_stop_strings(tmp_path):
    model = nt.models.from_gguf(_tiny_gguf(tmp_path, "F32"))
    tok = model.tokenizer
    assert tok is not None and tok.eos_id == 2 and model.config.vocab_size == tok.vocab_size
    ids = [tok.bos_id] + tok.encode("hello world")
    full = model.generate(np.array(ids), 8, temperature=0)
    text = tok.decode_bytes(full[len(ids):])
    stop = text[2:4].decode("utf-8", "replace") if len(text) >= 4 else None
    if stop and "\ufffd" not in stop:
        cut = model.generate(np.array(ids), 8, temperature=0, stop=[stop])
        assert stop.encode() in tok.decode_bytes(cut[len(ids):]) and len(cut) <= len(full)


def _step_logits(model, tokens, first):
    """The next-token logits after each prefix tokens[:first], tokens[:first+1], ... as
    generate() computes them (a prefill, then one token at a time through the KV cache)."""
    model.eval()
    model._begin_generation(len(tokens), 1)
    return np.stack([model._next_logits(tokens[None, :i]) for i in range(first, len(tokens) + 1)])


def _tape_step_logits(model, tokens, first, monkeypatch):
    """As _step_logits with the fused decoding step switched off (every token through the tape)."""
    with monkeypatch.context() as m:
        m.setattr(type(model), "_decode_one", lambda self, token, pos: None)
        return _step_logits(model, tokens, first)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_decoding_matches_dequantized(tmp_path, qtype, tie, monkeypatch):
    """Kept blocks run integer dot products on int8 activations (as llama.cpp does): their
    logits stay within 1.5x the error the weight quantisation itself makes (dequantised
    model vs the float model it was written from); greedy generation agrees."""
    src = _llama(tie_embeddings=tie)
    path = tmp_path / f"m_{qtype}.gguf"
    nt.models.gguf.write(path, src, qtype, metadata=sp_metadata())
    ref = nt.models.from_gguf(path)                        # dequantised to float32
    q = nt.models.from_gguf(path, keep_quantized=True)     # blocks kept
    assert set(q.quantized) == {"qkvw", "attn_out", "gate_up", "down"} | (set() if tie else {"lm_head"})
    assert q.params.size < ref.params.size / 2             # only embedding + norms stay float
    qbytes = sum(w.nbytes for ws in q.qweights.values() for w in (ws if isinstance(ws, list) else [ws]))
    assert qbytes < (ref.params.size - q.params.size) * 4 / 3
    tokens = np.array([1, 5, 9, 200, 7, 3, 11, 42, 8, 100], np.int32)
    lo, lr, lq = (_step_logits(m, tokens, 6) for m in (src, ref, q))
    weight_error = np.abs(lr - lo).max()
    assert 0 < np.abs(lq - lr).max() <= 1.5 * weight_error
    # the fused decoding step computes what the tape path computes (same integer kernels),
    # except that with tied embeddings its classifier is the file's quantised token_embd (as
    # llama.cpp's is), where the tape multiplies by the float embedding
    lt = _tape_step_logits(q, tokens, 6, monkeypatch)
    if tie:
        assert q.tied_head[0] == qtype and np.abs(lq - lt).max() <= 1.5 * weight_error
    else:
        assert q.tied_head is None and np.abs(lq - lt).max() <= 1e-5 * np.abs(lt).max()
    cached = q.generate(tokens[:6], 6, temperature=0)
    assert np.array_equal(ref.generate(tokens[:6], 6, temperature=0), cached)
    q.use_kv_cache = False                                 # the KV cache path = full recompute
    assert np.array_equal(q.generate(tokens[:6], 6, temperature=0), cached)
    q.forward(tokens[None, :6], tokens[None, :6])
    with pytest.raises(RuntimeError, match="forward-only"):
        q.backward()


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_fused_decoding_step_equals_the_tape_path(pairing, monkeypatch):
    """Float32 weights, grouped-query heads, Llama-3 RoPE scaling: the one-call decoding step
    gives the tape path's logits; shapes it does not cover fall back to the tape."""
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256, vocab_size=300, block_size=64,
                      rope_pairing=pairing, tie_embeddings=False, rope_scaling=(8.0, 1.0, 4.0, 16))
    model = Llama(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, 300, 12).astype(np.int32)
    fused, tape = _step_logits(model, tokens, 4), _tape_step_logits(model, tokens, 4, monkeypatch)
    assert np.abs(fused - tape).max() <= 1e-5 * np.abs(tape).max()
    model._begin_generation(8, 1)
    model._next_logits(tokens[None, :4])
    assert model._decode_one(int(tokens[4]), 4) is not None
    windowed = Llama(LlamaConfig(**{**cfg.__dict__, "sliding_window": 4}), seed=1)
    windowed._begin_generation(8, 1)
    assert windowed._decode_one(int(tokens[4]), 4) is None


def test_k_quant_decoding_matches_dequantized(monkeypatch):
    """Q4_K and Q6_K blocks (random, as no nt writer makes them) kept in a Llama decode like
    the float model holding their dequantised values."""
    from .test_qdot import random_blocks
    rng = np.random.default_rng(0)
    cfg = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=512, vocab_size=300,
                      block_size=32, tie_embeddings=False)
    kinds = {"qkvw": "Q4_K", "attn_out": "Q6_K", "gate_up": "Q4_K", "down": "Q6_K", "lm_head": "Q6_K"}
    q = Llama(cfg, seed=0, quantized=kinds)
    ref = Llama(cfg, seed=0)
    for name, kind in kinds.items():
        shape = ref.params[name].shape
        OC, C = shape[-2:]
        if name == "lm_head":
            q.qweights[name] = random_blocks(kind, OC, C, rng, (1e-5, 1e-4))
            ref.params[name].data[:] = gguf.dequantize(q.qweights[name], kind, (OC, C))
        else:
            q.qweights[name] = [random_blocks(kind, OC, C, rng, (1e-5, 1e-4)) for _ in range(cfg.n_layers)]
            for l in range(cfg.n_layers):
                ref.params[name][l].data[:] = gguf.dequantize(q.qweights[name][l], kind, (OC, C))
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.int32)
    lr, lq = _step_logits(ref, tokens, 4), _step_logits(q, tokens, 4)
    # int8 activations: an error of ~1/254 of each activation block's max per matmul
    assert np.abs(lq - lr).max() <= 0.02 * np.abs(lr).max()
    lt = _tape_step_logits(q, tokens, 4, monkeypatch)
    assert np.abs(lq - lt).max() <= 1e-5 * np.abs(lt).max()
    lf = _tape_step_logits(ref, tokens, 4, monkeypatch)    # the fused float path = the tape's
    assert np.abs(lr - lf).max() <= 1e-5 * np.abs(lf).max()
    assert np.array_equal(ref.generate(tokens[:4], 5, temperature=0), q.generate(tokens[:4], 5, temperature=0))
    q.qweights["down"] = q.qweights["down"][:, :, :-210].copy()   # a block short: refused, not read past
    q._begin_generation(8, 1)
    with pytest.raises(ValueError, match="quantised down must be"):
        q._decode_one(int(tokens[0]), 1)


def random_quantized_llama(cfg: LlamaConfig, kind, rng) -> Llama:
    """A Llama whose every matrix (the classifier too) is kept as random `kind` blocks
    (None: float32, seed 0)."""
    names = ("qkvw", "attn_out", "gate_up", "down", "lm_head")
    q = Llama(cfg, seed=0, quantized=dict.fromkeys(names, kind) if kind else None)
    shapes = Llama(cfg, seed=0).params if kind else {}
    for name in q.quantized:
        shape = shapes[name].shape
        blocks = [gguf.quantize(rng.standard_normal(shape[-2:]).astype(np.float32) * 0.1, kind)
                  for _ in range(cfg.n_layers if name != "lm_head" else 1)]
        q.qweights[name] = blocks if name != "lm_head" else blocks[0]
    return q


@pytest.mark.parametrize("kind", [None, "Q8_0", "Q4_0"])
def test_fused_decoding_with_row_counts_not_a_multiple_of_four(kind, monkeypatch):
    """The fused step takes weight rows four at a time; here every matrix leaves a tail: head
    size 6 (q rows 12, k and v rows 6 per kv head), vocab 301, and (float) 99 hidden units,
    an odd count of gate/up pairs. Same logits as the tape path."""
    ffn = 99 if kind is None else 160
    cfg = LlamaConfig(dim=96, n_layers=2, n_heads=16, n_kv_heads=8, ffn_hidden=ffn, vocab_size=301, block_size=32,
                      tie_embeddings=False)
    q = random_quantized_llama(cfg, kind, np.random.default_rng(2))
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6, 300, 3], np.int32)
    fused, tape = _step_logits(q, tokens, 4), _tape_step_logits(q, tokens, 4, monkeypatch)
    assert q._decode_plan is not None
    assert np.abs(fused - tape).max() <= 1e-5 * np.abs(tape).max()


def test_linear_q_rejects_bad_input():
    t = nt.tape.Tape("cpu", np.float32)
    x = t.new((2, 64))
    w = gguf.quantize(np.ones((8, 64), np.float32), "Q8_0")
    assert ops.linear_q(t, x, w, "Q8_0").shape == (2, 8)
    with pytest.raises(ValueError, match="kind"):
        ops.linear_q(t, x, w, "Q5_1")
    with pytest.raises(ValueError, match="uint8"):
        ops.linear_q(t, x, w[:, :-1].copy(), "Q8_0")
    with pytest.raises(ValueError, match="multiple"):
        ops.linear_q(t, t.new((2, 48)), w, "Q8_0")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_linear_q_prefill_expands_the_weight_and_decoding_runs_the_integer_kernel(kind):
    """From DEQUANT_ROWS rows on, linear_q expands W into scratch and uses BLAS (= x @
    dequantize(W)); fewer rows run the integer kernels on int8-quantised rows of x."""
    from .test_qdot import ref_matmul
    rng = np.random.default_rng(0)
    OC, C, N = 40, 96, ops.DEQUANT_ROWS + 5
    wq = gguf.quantize(rng.standard_normal((OC, C)).astype(np.float32), kind)
    w = gguf.dequantize(wq, kind, (OC, C))
    x = rng.standard_normal((N, C)).astype(np.float32)
    t = nt.tape.Tape("cpu", np.float32)
    xt = t.new((N, C))
    xt.data[:] = x
    prefill = ops.linear_q(t, xt, wq, kind).data.copy()
    decoded = np.concatenate([_linear_q_rows(t, x[i:i + 3], wq, kind) for i in range(0, N, 3)])
    np.testing.assert_allclose(prefill, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    assert np.array_equal(decoded, ref_matmul(kind, x, wq))


def _linear_q_rows(t, x, wq, kind):
    xt = t.new(x.shape)
    xt.data[:] = x
    assert x.shape[0] < ops.DEQUANT_ROWS
    return ops.linear_q(t, xt, wq, kind).data.copy()


@pytest.mark.parametrize("make", ["gpt2", "llama"])
@pytest.mark.parametrize("n_new", [5, 30])   # 30: past block_size 16, the cache refills
def test_batched_generation_equals_one_prompt_at_a_time(make, n_new):
    """A (B, T) batch gives each row what generating that row alone gives, with the KV
    cache (one cache row per prompt) and without."""
    if make == "gpt2":
        model = GPT2(GPT2Config(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    else:
        cfg = LlamaConfig.preset("llama-tiny", vocab_size=64, block_size=16, n_kv_heads=1, sliding_window=5)
        model = Llama(cfg, seed=0)
    prompts = np.array([[1, 2, 3, 4], [9, 8, 7, 6], [5, 5, 5, 5]], np.int32)
    for use_cache in (True, False):
        model.use_kv_cache = use_cache
        batch = model.generate(prompts, n_new, temperature=0)
        assert batch.shape == (3, 4 + n_new)
        for b in range(3):
            assert np.array_equal(batch[b], model.generate(prompts[b], n_new, temperature=0)), (use_cache, b)
    sampled = model.generate(prompts, 4, temperature=1.0, top_k=10, seed=3)
    assert np.array_equal(sampled, model.generate(prompts, 4, temperature=1.0, top_k=10, seed=3))


def test_generate_rejects_bad_prompts():
    model = GPT2(GPT2Config(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
    with pytest.raises(ValueError, match="single"):
        model.generate(np.ones((2, 3), np.int32), 2, stop=[1])
    with pytest.raises(ValueError, match="integer prompt"):
        model.generate(np.ones((2, 3, 1), np.int32), 2)
    with pytest.raises(ValueError, match="integer prompt"):
        model.generate(np.array([], np.int32), 2)
    with pytest.raises(ValueError, match="integer prompt"):
        model.generate(np.array([0.5, 1.5]), 2)
