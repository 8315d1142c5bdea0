"""llama.cpp's "qwen2", "qwen3" and "gemma3" architectures and tokenizers in GGUF (nt.models.gguf: M).

Conventions are checked against llama.cpp's own Python package (`gguf`: tensor names per
architecture, metadata keys, its reader and writer) and against transformers' logits for
the tiny Qwen2 and Gemma-3 models under tests/fixtures/hf/models (converted to GGUF here
the way llama.cpp's convert_hf_to_gguf.py does: Gemma's norms stored as 1 + w, no q/k row
permutation for these NEOX-RoPE architectures). Neither library is needed by nt.
"""
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from nt.io import FormatError, load_safetensors  # noqa: E402
from nt.io import gguf as G  # noqa: E402
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig, from_gguf  # noqa: E402
from nt.models import gguf as M  # noqa: E402
from nt.tokenizer import CHAT_TOKENS, ENDOFTEXT, PRE_TOKENIZERS, BPE, SentencePieceBPE  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "models"
V = 300
IDX = np.random.default_rng(0).integers(0, V, (2, 14)).astype(np.int32)

# the option sets of LlamaConfig that make each llama.cpp architecture
QWEN2 = dict(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6)
GEMMA3 = dict(ffn_kind="geglu", qk_norm=True, post_norms=True, embed_scale=True, head_dim=32, norm_eps=1e-6,
              sliding_window=4, global_every=2, rope_theta=1e6, rope_local_theta=10000.0)
QWEN3 = dict(qk_norm=True, rope_theta=1e6, norm_eps=1e-6)
ARCHS = {"qwen2": QWEN2, "qwen3": QWEN3, "gemma3": GEMMA3}


def _model(arch: str, seed: int = 1, **kw) -> Llama:
    """A tiny random nt Llama of `arch`'s options, its norms and biases random too (so a norm
    convention or a bias mapping that is off shows in the logits)."""
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=V, **{**ARCHS[arch], **kw})
    model = Llama(cfg, seed=seed)
    flat = model.params.to_flat()
    rng = np.random.default_rng(seed)
    for name, t in model.params.items():
        if "norm" in name or name == "qkvb":
            o = model.params.offsets[name]
            flat[o:o + t.size] = (1.0 if "norm" in name else 0.0) + 0.2 * rng.standard_normal(t.size)
    model.load_flat(flat)
    return model


def _logits(model, idx=IDX) -> np.ndarray:
    return model(idx)[0][..., :model.config.vocab_size].copy()


def _fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _key_names(group: type, arch: str) -> set:
    """Every metadata key gguf.constants.Keys (nested classes of templates) spells for `arch`."""
    names = set()
    for k, v in vars(group).items():
        if isinstance(v, str) and v.startswith("{arch}."):
            names.add(v.replace("{arch}", arch))
        elif isinstance(v, type):
            names |= _key_names(v, arch)
    return names


# ---------------------------------------------------------------------- nt -> GGUF -> nt

@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("tie", [True, False])
def test_write_read_same_logits(tmp_path, arch, pairing, tie):
    """Both RoPE pairings export to the architecture's (half) pairing: an "interleaved" model
    has its q/k rows, biases and qk-norm weights permuted, and computes the same function."""
    model = _model(arch, rope_pairing=pairing, tie_embeddings=tie)
    M.write(tmp_path / "m.gguf", model, "F32")
    back = M.load(tmp_path / "m.gguf")
    assert back.config.rope_pairing == "half" and back.config.tie_embeddings == tie
    for key in ("qkv_bias", "qk_norm", "post_norms", "embed_scale", "ffn_kind", "sliding_window", "global_every",
                "head_dim", "norm_eps", "rope_theta"):
        assert getattr(back.config, key) == pytest.approx(getattr(model.config, key)), key
    ref = _logits(model)
    np.testing.assert_allclose(_logits(back), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype,tol", [("F16", 5e-3), ("Q8_0", 3e-2)])
def test_write_read_quantized(tmp_path, arch, dtype, tol):
    model = _model(arch)
    M.write(tmp_path / "m.gguf", model, dtype)
    ref = _logits(model)
    for keep in (False, True):   # Qwen2's biases: nothing is kept quantised, all dequantised
        back = M.load(tmp_path / "m.gguf", keep_quantized=keep)
        assert not (arch == "qwen2" and back.quantized)
        assert np.abs(_logits(back) - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_names_and_keys_are_llama_cpps(tmp_path, arch):
    """Every tensor nt writes is one llama.cpp's architecture lists (gguf.constants.MODEL_TENSORS),
    every <arch>.* key one of gguf.constants.Keys, and the gguf package reads the same tensors."""
    model = _model(arch, tie_embeddings=False)
    M.write(tmp_path / "m.gguf", model, "F16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    kind = next(k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    known = {gguf.TENSOR_NAMES[t].format(bid=l) for t in gguf.MODEL_TENSORS[kind] for l in range(2)}
    names = {t.name for t in r.tensors}
    assert {n.rsplit(".", 1)[0] for n in names} <= known
    fields = _fields(tmp_path / "m.gguf")
    assert {k for k in fields if k.startswith(arch + ".")} <= _key_names(gguf.Keys, arch)
    assert fields["general.architecture"] == arch and fields[f"{arch}.vocab_size"] == V
    assert fields[f"{arch}.context_length"] == 64 and fields[f"{arch}.block_count"] == 2
    # the gguf package sees the same tensors nt wrote (F16 matrices, F32 norms and biases)
    _, arrays = M._llama_export(model)
    assert names == set(arrays)
    for t in r.tensors:
        assert tuple(reversed(t.shape.tolist())) == arrays[t.name].shape
        np.testing.assert_allclose(np.asarray(t.data, np.float32).reshape(arrays[t.name].shape), arrays[t.name],
                                   rtol=1e-3, atol=1e-3)
        assert (t.tensor_type == gguf.GGMLQuantizationType.F16) == (arrays[t.name].ndim == 2)


def test_qwen2_layout(tmp_path):
    M.write(tmp_path / "q.gguf", _model("qwen2"), "F32")
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    ne = {t.name: t.shape.tolist() for t in r.tensors}
    assert ne["blk.0.attn_q.bias"] == [64] and ne["blk.1.attn_k.bias"] == [32] and ne["blk.1.attn_v.bias"] == [32]
    assert "blk.0.attn_output.bias" not in ne and "output.weight" not in ne   # tied
    assert len(ne) == 2 * 12 + 2


def test_gemma3_layout_and_keys(tmp_path):
    M.write(tmp_path / "g.gguf", _model("gemma3"), "F32")
    r = gguf.GGUFReader(tmp_path / "g.gguf")
    ne = {t.name: t.shape.tolist() for t in r.tensors}
    assert ne["blk.0.attn_q.weight"] == [64, 4 * 32] and ne["blk.0.attn_k.weight"] == [64, 2 * 32]
    assert ne["blk.0.attn_q_norm.weight"] == [32] and ne["blk.1.attn_k_norm.weight"] == [32]
    assert ne["blk.0.attn_output.weight"] == [4 * 32, 64]
    assert ne["blk.0.post_attention_norm.weight"] == [64] and ne["blk.1.post_ffw_norm.weight"] == [64]
    assert len(ne) == 2 * 13 + 2
    f = _fields(tmp_path / "g.gguf")
    assert f["gemma3.attention.key_length"] == 32 and f["gemma3.attention.value_length"] == 32
    assert f["gemma3.attention.sliding_window"] == 4 and f["gemma3.attention.sliding_window_pattern"] == 2
    assert f["gemma3.rope.freq_base_swa"] == 10000.0 and f["gemma3.rope.freq_base"] == 1e6


def test_gemma3_without_sliding_window(tmp_path):
    """Every layer global: no sliding-window keys are written, and none read back as that."""
    model = _model("gemma3", sliding_window=0)
    M.write(tmp_path / "g.gguf", model, "F32")
    assert not any("sliding_window" in k or "swa" in k for k in _fields(tmp_path / "g.gguf"))
    back = M.load(tmp_path / "g.gguf")
    assert back.config.sliding_window == 0
    np.testing.assert_allclose(_logits(back), _logits(model), rtol=0, atol=1e-6)


def test_gemma3_defaults_are_llama_cpps(tmp_path):
    """Without sliding_window_pattern / rope.freq_base_swa, a gemma3 file is read as llama.cpp's
    graph runs it: five local layers then a global one, local RoPE base 10000; without a
    sliding window every layer is global."""
    meta, arrays = M._llama_export(_model("gemma3", global_every=6, rope_local_theta=500.0))
    tensors = {n: (a, "F32") for n, a in arrays.items()}
    for key in ("gemma3.attention.sliding_window_pattern", "gemma3.rope.freq_base_swa"):
        meta.pop(key)
    G.write_gguf(tmp_path / "d.gguf", meta, tensors)
    cfg = M.load(tmp_path / "d.gguf").config
    assert (cfg.sliding_window, cfg.global_every, cfg.rope_local_theta) == (4, 6, 10000.0)
    meta.pop("gemma3.attention.sliding_window")
    G.write_gguf(tmp_path / "n.gguf", meta, tensors)
    assert M.load(tmp_path / "n.gguf").config.sliding_window == 0
    # the per-layer form of the pattern (true: sliding window)
    G.write_gguf(tmp_path / "p.gguf", {**meta, "gemma3.attention.sliding_window": 4,
                                       "gemma3.attention.sliding_window_pattern": [True, False]}, tensors)
    assert M.load(tmp_path / "p.gguf").config.global_every == 2


@pytest.mark.parametrize("changes,fragments", [
    ({"gemma3.attention.sliding_window_pattern": [False, True]}, ["'gemma3.attention.sliding_window_pattern'",
                                                                  "not periodic"]),
    ({"gemma3.attention.sliding_window_pattern": [True]}, ["1 entries for 2 layers"]),
    ({"gemma3.attention.sliding_window_pattern": np.int32(-1)}, ["must be >= 0"]),
    ({"gemma3.attention.sliding_window": np.int32(-4)}, ["'gemma3.attention.sliding_window'", "must be in"]),
    ({"gemma3.attention.sliding_window": "4"}, ["'gemma3.attention.sliding_window'", "must be int"]),
    ({"gemma3.rope.freq_base_swa": 0.0}, ["'gemma3.rope.freq_base_swa'", "finite positive"]),
    ({"gemma3.final_logit_softcapping": 30.0}, ["'gemma3.final_logit_softcapping'", "soft-capping"]),
    ({"gemma3.attention.key_length": 16}, ["'gemma3.rope.dimension_count'", "head size 16"]),
    ({f"gemma3.{k}": 16 for k in ("attention.key_length", "attention.value_length", "rope.dimension_count")},
     ["'blk.0.attn_q.weight'", "(128, 64)", "(64, 64)"]),
    ({"gemma3.rope.scaling.factor": 8.0}, ["'gemma3.rope.scaling.factor'", "RoPE scaling"]),
])
def test_bad_gemma3_metadata_is_refused(tmp_path, changes, fragments):
    meta, arrays = M._llama_export(_model("gemma3"))
    G.write_gguf(tmp_path / "b.gguf", {**meta, **changes}, {n: (a, "F32") for n, a in arrays.items()})
    with pytest.raises(FormatError) as e:
        M.load(tmp_path / "b.gguf")
    for frag in [str(tmp_path / "b.gguf")] + fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_bad_qwen2_files_are_refused(tmp_path):
    meta, arrays = M._llama_export(_model("qwen2"))
    tensors = {n: (a, "F32") for n, a in arrays.items()}
    G.write_gguf(tmp_path / "b.gguf", meta, {n: t for n, t in tensors.items() if n != "blk.1.attn_v.bias"})
    with pytest.raises(FormatError, match="missing tensor 'blk.1.attn_v.bias'"):
        M.load(tmp_path / "b.gguf")
    G.write_gguf(tmp_path / "c.gguf", meta, {**tensors, "blk.0.attn_q_norm.weight": (np.ones(16, np.float32), "F32")})
    with pytest.raises(FormatError, match="'blk.0.attn_q_norm.weight'.*not part of nt's qwen2 model"):
        M.load(tmp_path / "c.gguf")
    G.write_gguf(tmp_path / "d.gguf", {**meta, "qwen2.block_count": 10 ** 6}, tensors)
    with pytest.raises(FormatError, match="12000000 tensors"):
        M.load(tmp_path / "d.gguf")


def test_llama_variants_llama_cpp_cannot_run_are_refused(tmp_path):
    base = LlamaConfig.preset("llama-tiny", vocab_size=V)
    for options, fragment in [(dict(post_norms=True), "post_norms"), (dict(norm="layernorm"), "norm='rmsnorm'"),
                              (dict(qkv_bias=True, sliding_window=8), "sliding_window=0"),
                              (dict(n_predict=2), "n_predict=1")]:
        with pytest.raises(ValueError, match=fragment):
            M.write(tmp_path / "x.gguf", Llama(LlamaConfig(**{**vars(base), **options}), seed=0), "F32")
    assert not (tmp_path / "x.gguf").exists()


def test_quantized_model_is_not_exported(tmp_path):
    M.write(tmp_path / "q.gguf", _model("gemma3"), "Q8_0")
    with pytest.raises(ValueError, match="keep_quantized=False"):
        M.write(tmp_path / "x.gguf", M.load(tmp_path / "q.gguf", keep_quantized=True), "Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_export_sees_frozen_parameters(tmp_path):
    """A model with frozen parameters exports every parameter (canonical order, not the
    trainable buffer's)."""
    model = _model("qwen2")
    ref = _logits(model)
    model.freeze(["qkvw", "qkvb"])
    M.write(tmp_path / "f.gguf", model, "F32")
    np.testing.assert_allclose(_logits(M.load(tmp_path / "f.gguf")), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------- transformers' models, llama.cpp's conversion

def _hf_to_gguf(folder: Path, path: Path) -> None:
    """Write the fixture model in `folder` as llama.cpp's convert_hf_to_gguf.py would, with
    the gguf package's GGUFWriter: qwen2 or gemma3 metadata, HF names -> GGUF names, Gemma's
    norm weights + 1, q/k rows as they are (both architectures rotate NEOX-style)."""
    import json
    cfg = json.loads((folder / "config.json").read_text())
    weights, _ = load_safetensors(folder / "model.safetensors")
    gemma = cfg["model_type"] == "gemma3_text"
    arch = "gemma3" if gemma else "qwen2"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(0)
    if gemma:
        rope = cfg["rope_parameters"]
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_sliding_window(cfg["sliding_window"])
        # this fixture alternates local and global layers (llama.cpp's default period is 6)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    else:
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    if gemma:
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    for hf_name, a in weights.items():
        a = np.asarray(a, np.float32)
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, l, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{l}.{names[module]}.{kind}"
        if gemma and hf_name.endswith("norm.weight"):
            a = a + 1.0   # HF's Gemma RMSNorm multiplies by 1 + w; llama.cpp's graph by the stored weight
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_transformers_models_converted_as_llama_cpp_does(tmp_path, arch):
    folder = FIXTURES / arch
    if not (folder / "logits.npy").exists():
        pytest.skip(f"no fixture {folder}")
    _hf_to_gguf(folder, tmp_path / "m.gguf")
    model = from_gguf(tmp_path / "m.gguf")
    ref = np.load(folder / "logits.npy")
    got = _logits(model, np.load(folder / "input_ids.npy").astype(np.int32))
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err
    # and nt's own export of that model reads back the same
    M.write(tmp_path / "again.gguf", model, "F32")
    np.testing.assert_allclose(_logits(M.load(tmp_path / "again.gguf")), _logits(model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- tokenizers

TEXTS = ["Hello world, it's 2026!", "  spaces\n\nand\ttabs ", "naïve café ünïcödé 😀", "x<|endoftext|>y",
         "<|im_start|>user\nhi<|im_end|>", "1234567 numbers 3.14", ""]


def _bpe(pre: str = "gpt2") -> BPE:
    text = " ".join(TEXTS * 20) + " the quick brown fox jumps over the lazy dog " * 30
    return BPE.train(text, 300, special_tokens=(ENDOFTEXT, *CHAT_TOKENS), pre=pre)


def test_pre_tokenizer_names_read_back():
    assert set(M.PRE_TOKENIZER_NAMES) == set(PRE_TOKENIZERS)
    for pre, name in M.PRE_TOKENIZER_NAMES.items():
        assert M.GGUF_PRE_TOKENIZERS[name] == pre


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_bpe_round_trip(tmp_path, pre):
    tok = _bpe(pre)
    model = GPT2(GPT2Config.preset("tiny", vocab_size=tok.vocab_size + 5), seed=0)   # 5 rows of padding
    M.write(tmp_path / "t.gguf", model, "Q8_0", tokenizer=tok)
    back = from_gguf(tmp_path / "t.gguf")
    t = back.tokenizer
    assert isinstance(t, BPE) and t.pre == pre
    for s in TEXTS:
        assert t.encode(s) == tok.encode(s) and t.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
        assert t.decode(tok.encode(s)) == s
    eot = tok.special_tokens[ENDOFTEXT]
    assert (t.bos_id, t.eos_id, t.add_bos) == (eot, eot, False)
    f = _fields(tmp_path / "t.gguf")
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == M.PRE_TOKENIZER_NAMES[pre]
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == tok.vocab_size + 5 and tokens[-1] == f"[PAD{tok.vocab_size + 4}]"
    assert tokens[eot] == ENDOFTEXT and tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ"
    assert f["tokenizer.ggml.merges"][0] == " ".join(tokens[i] for i in tok.merges[0])
    assert len(f["tokenizer.ggml.merges"]) == len(tok.merges)
    types = f["tokenizer.ggml.token_type"]
    assert types[eot] == 3 and types[ord("A")] == 1 and types[-1] == 5
    assert f["tokenizer.ggml.bos_token_id"] == eot == f["tokenizer.ggml.eos_token_id"]
    assert "tokenizer.chat_template" not in f
    assert f["gpt2.vocab_size"] == tok.vocab_size + 5 and f["gpt2.context_length"] == 64
    # the value types llama.cpp's loader reads them as
    T = gguf.GGUFValueType
    types = {k: v.types for k, v in gguf.GGUFReader(tmp_path / "t.gguf").fields.items()}
    assert types["tokenizer.ggml.token_type"] == [T.ARRAY, T.INT32] and types["tokenizer.ggml.tokens"] == [T.ARRAY, T.STRING]
    assert types["tokenizer.ggml.merges"] == [T.ARRAY, T.STRING] and types["tokenizer.ggml.add_bos_token"] == [T.BOOL]
    assert types["tokenizer.ggml.bos_token_id"] == [T.UINT32]


def test_bpe_read_from_gguf_is_written_back(tmp_path):
    """A BPE a GGUF file carried keeps its own bos/eos, add_bos and chat template."""
    tok = _bpe("qwen2")
    model = Llama(LlamaConfig.preset("llama-tiny", vocab_size=tok.vocab_size, **QWEN2), seed=0)
    M.write(tmp_path / "a.gguf", model, "F32", tokenizer=tok)
    first = from_gguf(tmp_path / "a.gguf")
    t = first.tokenizer
    t.bos_id, t.eos_id = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    t.add_bos, t.chat_template = True, "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    M.write(tmp_path / "b.gguf", first, "F32", tokenizer=t)
    again = from_gguf(tmp_path / "b.gguf").tokenizer
    assert (again.bos_id, again.eos_id, again.add_bos, again.chat_template) == (t.bos_id, t.eos_id, True,
                                                                                 t.chat_template)
    assert again.pre == "qwen2" and all(again.encode(s) == tok.encode(s) for s in TEXTS)


def test_sentencepiece_and_gguf_tokenizer_round_trip(tmp_path):
    """A tokenizer read from a GGUF file (here SentencePiece with a chat template) is written
    back as it came."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁", "h", "e", "l", "o", "he", "ll", "▁he", "llo", "▁hello", "w", "r", "d", "▁w", "or", "ld", "▁world"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)
    tok = SentencePieceBPE(pieces, np.arange(len(pieces), dtype=np.float32) / 10, types)
    tok.bos_id, tok.eos_id, tok.chat_template = 1, 2, "{{ messages }}<start_of_turn>"
    cfg = dict(GEMMA3, vocab_size=len(pieces))
    model = Llama(LlamaConfig.preset("llama-tiny", **cfg), seed=0)
    M.write(tmp_path / "s.gguf", model, "F32", tokenizer=tok)
    t = from_gguf(tmp_path / "s.gguf").tokenizer
    assert isinstance(t, SentencePieceBPE) and (t.bos_id, t.eos_id, t.unk_id, t.add_bos) == (1, 2, 0, True)
    assert t.chat_template == tok.chat_template and t.tokens == pieces
    for s in ["hello world", "hello  wörld", "<s>hello</s>", ""]:
        assert t.encode(s) == tok.encode(s) and t.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
    f = _fields(tmp_path / "s.gguf")
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.scores"][5] == pytest.approx(0.5) and f["tokenizer.ggml.token_type"][3] == 6
    # and once more from what was read
    M.write(tmp_path / "s2.gguf", from_gguf(tmp_path / "s.gguf"), "F32", tokenizer=t)
    assert _fields(tmp_path / "s2.gguf")["tokenizer.ggml.tokens"] == pieces


def test_tokenizer_that_does_not_fit_is_refused(tmp_path):
    tok = _bpe()
    with pytest.raises(ValueError, match=f"{tok.vocab_size} tokens.*280 rows"):
        M.write(tmp_path / "x.gguf", GPT2(GPT2Config.preset("tiny", vocab_size=280), seed=0), "F32", tokenizer=tok)
    with pytest.raises(TypeError, match="ByteTokenizer"):
        from nt.tokenizer import ByteTokenizer
        M.write(tmp_path / "x.gguf", GPT2(GPT2Config.preset("tiny", vocab_size=300), seed=0), "F32",
                tokenizer=ByteTokenizer())
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------- transformers reads nt's exports

def _hf_cases() -> dict:
    """Models whose nt export transformers' GGUF loader sizes from the file alone. Its GPT-2
    mapping takes the vocabulary only from tokenizer.ggml.tokens and sends
    gpt2.context_length to n_ctx, which GPT2Config ignores (wpe is n_positions = 1024 rows):
    so the GPT-2 carries a tokenizer and 1024 positions. It does not read key_length for
    qwen3 (head_dim stays at Qwen3Config's 128) and its Gemma-3 config keeps
    query_pre_attn_scalar at 256 (with a head size of 256 that is 1/sqrt(head size), as in
    llama.cpp and nt): so those head sizes."""
    tok = _bpe()
    gemma = dict(GEMMA3, head_dim=256, global_every=6)
    return {
        "llama": (lambda: Llama(LlamaConfig.preset("llama-tiny", vocab_size=V), seed=1), None),
        "qwen2": (lambda: _model("qwen2"), None),
        "qwen3": (lambda: _model("qwen3", head_dim=128), None),
        "gemma3": (lambda: Llama(LlamaConfig.preset("llama-tiny", vocab_size=V, **gemma), seed=1), None),
        "gpt2": (lambda: GPT2(GPT2Config.preset("tiny", vocab_size=tok.vocab_size, block_size=1024), seed=1), tok),
    }


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "gpt2"])
def test_transformers_loads_nt_exports(tmp_path, arch):
    """AutoModelForCausalLM.from_pretrained(folder, gguf_file=...) on nt's export gives nt's
    logits (needs torch, transformers and accelerate: test oracles only)."""
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    make, tok = _hf_cases()[arch]
    model = make()
    M.write(tmp_path / "m.gguf", model, "F32", tokenizer=tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    idx = IDX % model.config.vocab_size
    with torch.no_grad():
        got = hf(torch.tensor(idx, dtype=torch.long)).logits.numpy()
    ref = _logits(model, idx)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------- hostile qwen2 / gemma3 files

def _tiny_file(arch: str, path: Path) -> tuple[bytes, int]:
    """A whole tiny file of `arch` (width 8) with a byte-level BPE, as bytes, and where its
    header (metadata and directory) ends."""
    options = {**ARCHS[arch], "head_dim": 4} if arch == "gemma3" else ARCHS[arch]
    cfg = LlamaConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=262, block_size=16,
                      **options)
    tok = BPE.train("aa ab ba bb " * 20, 262, special_tokens=(ENDOFTEXT,))
    M.write(path, Llama(cfg, seed=3), "F32", tokenizer=tok)
    with G.GGUFFile(path) as f:
        head = f.data_offset
    return path.read_bytes(), head


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_fuzz_mutated_files_load_or_raise_format_error(tmp_path, arch):
    """Whatever a mutation does to a qwen2 / gemma3 file's keys, values or directory, load
    builds a model or raises FormatError naming the file: never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    data, head = _tiny_file(arch, tmp_path / "base.gguf")
    assert M.load(tmp_path / "base.gguf").tokenizer.vocab_size == 262
    special = [0, 1, 2, 3, 4, 6, 31, 2 ** 16, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]
    mutation = st.one_of(st.tuples(st.just("xor"), st.integers(24, head - 1), st.integers(1, 255)),
                         st.tuples(st.just("<I"), st.integers(24, head - 4), st.sampled_from(special[:10])),
                         st.tuples(st.just("<Q"), st.integers(24, head - 8), st.sampled_from(special)))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(mutation, min_size=1, max_size=2))
    def check(ops):
        import struct
        mutated = bytearray(data)
        for kind, pos, arg in ops:
            if kind == "xor":
                mutated[pos] ^= arg
            else:
                struct.pack_into(kind, mutated, pos, arg)
        path = tmp_path / "m.gguf"
        path.write_bytes(bytes(mutated))
        try:
            model = M.load(path)
            assert model.tokenizer is None or model.tokenizer.vocab_size <= model.config.vocab_size
        except FormatError as e:
            assert str(path) in str(e)

    check()
