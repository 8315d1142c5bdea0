"""The fused decoder on matrices whose layers and q/k/v (gate/up) parts mix block types, as
llama.cpp's Q4_K_M files do (Q4_K q/k with Q6_K v in some layers, down Q4_K or Q6_K by layer)."""
import numpy as np
import pytest

from nt.io import gguf
from nt.models import Llama, LlamaConfig
from nt.models import gguf as gguf_models

from .test_generate_quant import _step_logits
from .test_qdot import random_blocks

CFG = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=512, vocab_size=300, block_size=32,
                  tie_embeddings=False)
PARTS = {"qkvw": (256, 128, 128), "down": (256,)}


def _mixed_pair(kinds: dict):
    """A Llama whose qkvw / down run from decode_blocks of kinds[name][l][part] (random K-quant
    blocks; the float params hold their values, as the loader leaves them), and a float twin."""
    rng = np.random.default_rng(0)
    q, ref = Llama(CFG, seed=0, quantized={"attn_out": "Q4_K", "gate_up": "Q4_K"}), Llama(CFG, seed=0)
    for name in q.params:   # fewer params drew from the seed's stream: take the twin's
        q.params[name].data[:] = ref.params[name].data
    for name in ("attn_out", "gate_up"):
        OC, C = ref.params[name].shape[-2:]
        q.qweights[name] = [random_blocks("Q4_K", OC, C, rng, (1e-5, 1e-4)) for _ in range(CFG.n_layers)]
        for l in range(CFG.n_layers):
            ref.params[name][l].data[:] = gguf.dequantize(q.qweights[name][l], "Q4_K", (OC, C))
    q.decode_blocks = {}
    for name, layers in kinds.items():
        C = ref.params[name].shape[-1]
        flat = []
        for l, parts in enumerate(layers):
            r0 = 0
            for kind, n in zip(parts, PARTS[name]):
                blocks = random_blocks(kind, n, C, rng, (1e-5, 1e-4))
                ref.params[name][l].data[r0:r0 + n] = gguf.dequantize(blocks, kind, (n, C))
                flat.append(blocks.reshape(-1))
                r0 += n
            q.params[name][l].data[:] = ref.params[name][l].data
        q.decode_blocks[name] = (np.concatenate(flat), layers)
    return q, ref


def test_mixed_block_types_decode_like_the_float_model():
    kinds = {"qkvw": [["Q4_K", "Q4_K", "Q6_K"], ["Q6_K", "Q4_K", "Q4_K"]], "down": [["Q6_K"], ["Q4_K"]]}
    q, ref = _mixed_pair(kinds)
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.int32)
    lr, lq = _step_logits(ref, tokens, 4), _step_logits(q, tokens, 4)
    assert q._decode_plan[8][0].size and q._decode_plan[8][3].size   # qkvw, down ran on blocks
    # int8 activations: an error of ~1/254 of each activation block's max per matmul
    assert np.abs(lq - lr).max() <= 0.02 * np.abs(lr).max()
    assert np.array_equal(ref.generate(tokens[:4], 5, temperature=0), q.generate(tokens[:4], 5, temperature=0))


def test_one_type_as_parts_equals_the_kept_matrix():
    """decode_blocks holding one type everywhere gives the bits of the same blocks kept whole."""
    q, _ = _mixed_pair({"qkvw": [["Q6_K"] * 3] * 2, "down": [["Q4_K"]] * 2})
    whole = Llama(CFG, seed=0, quantized={"attn_out": "Q4_K", "gate_up": "Q4_K", "qkvw": "Q6_K", "down": "Q4_K"})
    whole.qweights.update(attn_out=q.qweights["attn_out"], gate_up=q.qweights["gate_up"])
    for name, (flat, _) in q.decode_blocks.items():
        whole.qweights[name] = flat.reshape(CFG.n_layers, sum(PARTS[name]), -1)
    for name in ("wte", "attn_norm", "ffn_norm", "norm_f", "lm_head"):
        whole.params[name].data[:] = q.params[name].data
    def fused(model):   # every position through the fused step (a prefill would take the tape path)
        model.eval()
        model._begin_generation(8, 1)
        return np.stack([model._decode_one(t, i) for i, t in enumerate([3, 1, 4, 1, 5, 9])])
    assert np.array_equal(fused(q), fused(whole))


@pytest.mark.parametrize("bad, match", [
    ({"down": [["Q6_K"], ["Q8_0"]]}, None),                       # Q8_0's 32-value activation blocks
    ({"qkvw": [["Q4_K", "Q8_0", "Q4_K"], ["Q4_K"] * 3]}, "activation formats"),
    ({"qkvw": [["Q4_K"] * 2, ["Q4_K"] * 3]}, "parts"),
    ({"down": "short"}, "decode blocks of down"),
    ({"down": [["Q6_K"]]}, "1 layers"),                           # one layer's types for two layers
])
def test_bad_decode_blocks_are_refused(bad, match):
    q, _ = _mixed_pair({"qkvw": [["Q4_K"] * 3] * 2, "down": [["Q6_K"], ["Q4_K"]]})
    for name, kinds in bad.items():
        flat, good = q.decode_blocks[name]
        q.decode_blocks[name] = (flat[:-1], good) if kinds == "short" else (flat, kinds)
    q._begin_generation(8, 1)
    if match is None:   # a layer of Q8_0 down rows is one format: the size no longer fits
        match = "decode blocks of down"
    with pytest.raises(ValueError, match=match):
        q._decode_one(3, 1)


def test_decode_step_refuses_a_token_or_position_out_of_range():
    """The fused kernel indexes the embedding and the KV cache unchecked: the boundary checks."""
    q, _ = _mixed_pair({"qkvw": [["Q4_K"] * 3] * 2, "down": [["Q6_K"], ["Q4_K"]]})
    q.eval()
    q._begin_generation(8, 1)
    for token, pos in ((CFG.vocab_size, 0), (-1, 0), (3, 8), (3, -1)):
        with pytest.raises(IndexError, match="decode step"):
            q._decode_one(token, pos)
    assert q._decode_one(3, 7) is not None


def _mixed_file(path, model, base: str, embedding: str = ""):
    """Write model as a GGUF file whose layer-1 v rows and down matrix are Q8_0, the token
    embedding `embedding` (base when empty), the other matrices `base`, the norms F32;
    return its loads with and without keep_quantized."""
    meta, arrays = gguf_models._llama_export(model)
    meta["tokenizer.ggml.model"] = "none"

    def kind(name):
        if arrays[name].ndim < 2:
            return "F32"
        if name == "token_embd.weight" and embedding:
            return embedding
        if name.startswith("blk.1.") and name.endswith(("attn_v.weight", "ffn_down.weight")):
            return "Q8_0"
        return base
    gguf.write_gguf(path, meta, {n: (a, kind(n)) for n, a in arrays.items()})
    return gguf_models.load(path, keep_quantized=True), gguf_models.load(path)


def test_loader_keeps_mixed_matrices_as_decode_blocks(tmp_path):
    """A GGUF file whose v rows and down matrices change type by layer (Q8_0 / Q4_0 here, the
    types nt writes): those matrices load float for the tape path plus decode-only blocks, and
    the fused step's logits match the dequantised model's."""
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=300, rope_pairing="interleaved", tie_embeddings=False)
    q, deq = _mixed_file(tmp_path / "mixed.gguf", Llama(cfg, seed=1), "Q4_0")
    assert set(q.decode_blocks) == {"qkvw", "down"} and "qkvw" not in q.quantized
    assert q.decode_blocks["qkvw"][1] == [["Q4_0"] * 3, ["Q4_0", "Q4_0", "Q8_0"]]
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    lq, ld = _step_logits(q, tokens, 4), _step_logits(deq, tokens, 4)
    assert q._decode_plan[8][0].size and q._decode_plan[8][3].size   # blocks, not float
    assert np.abs(lq - ld).max() <= 0.03 * np.abs(ld).max()


def test_q5_0_and_q8_0_parts_decode_like_the_float_model():
    """Q5_0 (what llama.cpp's Q4_K_M writes for rows of no multiple of 256) beside Q8_0 in
    one layer: both quantise the input to 32-value blocks, so they share one matrix."""
    kinds = {"qkvw": [["Q5_0", "Q5_0", "Q8_0"], ["Q5_0"] * 3], "down": [["Q5_0"], ["Q8_0"]]}
    q, ref = _mixed_pair(kinds)
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.int32)
    lr, lq = _step_logits(ref, tokens, 4), _step_logits(q, tokens, 4)
    assert q._decode_plan[8][0].size and q._decode_plan[8][3].size
    assert np.abs(lq - lr).max() <= 0.02 * np.abs(lr).max()
    assert np.array_equal(ref.generate(tokens[:4], 5, temperature=0), q.generate(tokens[:4], 5, temperature=0))


def test_loader_decodes_q5_0_matrices_on_blocks(tmp_path, monkeypatch):
    """A SmolLM2-style Q4_K_M file in miniature: every projection Q5_0, v and down Q8_0 in
    layer 1, a Q8_0 tied embedding. All four matrices decode from blocks (the mixed ones as
    decode_blocks; the all-Q5_0 ones too, or as qweights if ops.linear_q reads Q5_0), the
    classifier from token_embd's blocks."""
    import gguf as gguf_package
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=300, rope_pairing="interleaved", tie_embeddings=True)
    write_quantize = gguf.quantize   # nt writes no Q5_0: the gguf package's quantiser does

    def quantize(x, kind):
        if kind != "Q5_0":
            return write_quantize(x, kind)
        return np.asarray(gguf_package.quants.quantize(np.asarray(x, np.float32), gguf_package.GGMLQuantizationType.Q5_0)).view(np.uint8)
    monkeypatch.setattr(gguf, "quantize", quantize)
    monkeypatch.setattr(gguf, "WRITE_TYPES", gguf.WRITE_TYPES + ("Q5_0",))
    q, deq = _mixed_file(tmp_path / "q5.gguf", Llama(cfg, seed=1), "Q5_0", embedding="Q8_0")
    assert set(q.decode_blocks) | set(q.quantized) == {"qkvw", "attn_out", "gate_up", "down"}
    assert set(q.decode_blocks) >= {"qkvw", "down"} and set(q.quantized.values()) <= {"Q5_0"}
    assert q.decode_blocks["qkvw"][1] == [["Q5_0"] * 3, ["Q5_0", "Q5_0", "Q8_0"]] and q.tied_head[0] == "Q8_0"
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    lq, ld = _step_logits(q, tokens, 4), _step_logits(deq, tokens, 4)
    assert all(q._decode_plan[8][m].size for m in range(4)) and q._decode_plan[11].size   # blocks, not float
    assert np.abs(lq - ld).max() <= 0.03 * np.abs(ld).max()
