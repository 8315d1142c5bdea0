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


def _llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                          verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


MODELS = {
    "gpt2": lambda: GPT2(GPT2Config.preset("tiny", vocab_size=300), seed=1),
    "llama-half": lambda: Llama(LlamaConfig.preset("llama-tiny", vocab_size=300, rope_pairing="half"), seed=2),
    "llama-interleaved-untied": lambda: Llama(LlamaConfig.preset(
        "llama-tiny", vocab_size=300, rope_pairing="interleaved", tie_embeddings=False, rope_theta=5000.0), seed=3),
}


@pytest.mark.parametrize("dtype,tol", [("F32", 1e-4), ("F16", 2e-2), ("Q8_0", 5e-2)])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_llama_cpp_runs_nt_exports(tmp_path, arch, dtype, tol):
    model = MODELS[arch]()
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 300, 24)]
    ref = model(np.asarray([tokens], dtype=np.int32))[0][0].copy()
    gguf.write(tmp_path / "m.gguf", model, dtype)
    got = _llama_cpp_logits(tmp_path / "m.gguf", tokens)
    # llama.cpp computes in its own precision (F16 KV cache, quantised activations for
    # Q8_0 dot products): compare relative to the logits' scale
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), np.abs(got - ref).max()
