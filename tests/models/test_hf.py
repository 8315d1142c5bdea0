"""Hugging Face model folders in and out of nt (nt.models.from_pretrained, save_pretrained).

The fixtures under tests/fixtures/hf/models were written by transformers itself
(tests/fixtures/hf/make_models.py): each folder holds what save_pretrained wrote and
transformers' float32 logits for a fixed batch. These tests need neither torch nor
transformers; the slow test at the end loads nt's output with transformers when it is there.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nt.io import FormatError
from nt.io.safetensors import SafetensorsFile, bf16_to_float32, float_to_bf16, load_safetensors, save_safetensors
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig, from_pretrained
from nt.models.hf import parse_size

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "models"
ARCHS = ["gpt2", "llama", "qwen2", "mistral", "gemma3_text"]
TOL = 1e-4


def reference(arch: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, transformers' logits) of a fixture."""
    return np.load(FIXTURES / arch / "input_ids.npy"), np.load(FIXTURES / arch / "logits.npy")


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    return model(ids)[0].copy()


def copy_fixture(arch: str, tmp_path: Path) -> Path:
    folder = tmp_path / arch
    shutil.copytree(FIXTURES / arch, folder)
    return folder


def edit_config(folder: Path, drop=(), **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, change) -> None:
    """Rewrite a single-file fixture's tensors (as float32) through change(dict)."""
    tensors, _ = load_safetensors(folder / "model.safetensors")
    tensors = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}
    change(tensors)
    save_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})


# ---------------------------------------------------------------------- transformers' logits

@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch):
    ids, expected = reference(arch)
    model = from_pretrained(FIXTURES / arch)
    assert isinstance(model, GPT2 if arch == "gpt2" else Llama)
    np.testing.assert_allclose(logits_of(model, ids), expected, rtol=0, atol=TOL)


def test_fixtures_exercise_what_they_claim():
    """The configs the fixtures were made with map onto nt's options as intended."""
    llama = from_pretrained(FIXTURES / "llama").config
    assert llama.rope_scaling == (8.0, 1.0, 4.0, 16.0) and not llama.tie_embeddings and llama.n_kv_heads == 2
    qwen = from_pretrained(FIXTURES / "qwen2").config
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.rope_theta == 1e6
    mistral = from_pretrained(FIXTURES / "mistral").config
    assert (mistral.sliding_window, mistral.global_every) == (5, 0)
    gemma = from_pretrained(FIXTURES / "gemma3_text").config
    assert (gemma.sliding_window, gemma.global_every, gemma.head_dim) == (4, 2, 16)
    assert gemma.is_local(0) and not gemma.is_local(1)
    assert (gemma.rope_theta, gemma.rope_local_theta) == (1e6, 1e4)
    assert gemma.qk_norm and gemma.post_norms and gemma.embed_scale and gemma.ffn_kind == "geglu"
    assert len(list((FIXTURES / "gpt2").glob("model-*.safetensors"))) > 1   # the index path


@pytest.mark.parametrize("arch,change", [
    ("mistral", dict(sliding_window=None)),
    ("gemma3_text", dict(layer_types=["full_attention"] * 2)),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
])
def test_fixture_options_change_the_logits(tmp_path, arch, change):
    """Without its sliding window / RoPE scaling a fixture's logits differ from
    transformers': the batch is long enough for each option to matter."""
    folder = copy_fixture(arch, tmp_path)
    edit_config(folder, **change)
    ids, expected = reference(arch)
    assert np.abs(logits_of(from_pretrained(folder), ids) - expected).max() > 100 * TOL


def test_older_config_fields_load_the_same(tmp_path):
    """transformers 4's rope_theta / rope_scaling / rope_local_base_freq /
    sliding_window_pattern describe the same models as 5's rope_parameters / layer_types."""
    cases = {
        "llama": dict(drop=["rope_parameters"], rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}),
        "qwen2": dict(drop=["rope_parameters", "layer_types"], rope_theta=1e6, rope_scaling=None,
                      use_sliding_window=False, sliding_window=32768, max_window_layers=2),
        "gemma3_text": dict(drop=["rope_parameters", "layer_types", "_sliding_window_pattern"], rope_theta=1e6,
                            rope_local_base_freq=10000.0, sliding_window_pattern=2, rope_scaling=None,
                            hidden_act="gelu_pytorch_tanh"),
        "gpt2": dict(drop=["dtype"], n_ctx=32, torch_dtype="float16"),
    }
    for arch, change in cases.items():
        folder = copy_fixture(arch, tmp_path)
        edit_config(folder, **change)
        ids, expected = reference(arch)
        np.testing.assert_allclose(logits_of(from_pretrained(folder), ids), expected, rtol=0, atol=TOL)


def test_fields_of_published_configs_are_accepted(tmp_path):
    """Fields published configs carry that do not change the function (SmolLM2's
    is_llama_config / rope_interleaved / transformers.js_config, GPT-2's task_specific_params,
    generation settings, ids) are read as harmless, not refused."""
    extras = {
        "llama": dict(is_llama_config=True, rope_interleaved=False, pretraining_tp=1, attention_dropout=0.0,
                      initializer_range=0.041666666666666664, torch_dtype="bfloat16", _name_or_path="HuggingFaceTB/x",
                      **{"transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16"}}}),
        "gpt2": dict(n_ctx=32, task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}},
                     resid_pdrop=0.1, gradient_checkpointing=False),
        "gemma3_text": dict(cache_implementation="hybrid", _sliding_window_pattern=6, pad_token_id=0,
                            eos_token_id=[1, 106]),
        "qwen2": dict(bos_token_id=151643, eos_token_id=151645, max_length=512, do_sample=True, temperature=0.7),
    }
    for arch, change in extras.items():
        folder = copy_fixture(arch, tmp_path)
        edit_config(folder, **change)
        ids, expected = reference(arch)
        np.testing.assert_allclose(logits_of(from_pretrained(folder), ids), expected, rtol=0, atol=TOL)


def test_older_tensor_layouts_load(tmp_path):
    """GPT-2 saved from GPT2Model (no "transformer." prefix) with its mask buffers, a Llama
    with rotary inv_freq buffers and a tied lm_head written out: all load to the same model."""
    gpt2 = copy_fixture("gpt2", tmp_path)
    tensors = {}
    for f in sorted(gpt2.glob("model-*.safetensors")):
        tensors.update({k: np.array(v, np.float32) for k, v in load_safetensors(f)[0].items()})
        f.unlink()
    (gpt2 / "model.safetensors.index.json").unlink()
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_safetensors(gpt2 / "model.safetensors", tensors)
    ids, expected = reference("gpt2")
    np.testing.assert_allclose(logits_of(from_pretrained(gpt2), ids), expected, rtol=0, atol=TOL)

    qwen = copy_fixture("qwen2", tmp_path)
    edit_weights(qwen, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"],
                                           "model.layers.1.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    ids, expected = reference("qwen2")
    np.testing.assert_allclose(logits_of(from_pretrained(qwen), ids), expected, rtol=0, atol=TOL)


def test_a_folder_without_lm_head_is_tied(tmp_path):
    """tie_word_embeddings false but no lm_head.weight: the embedding is the classifier."""
    folder = copy_fixture("qwen2", tmp_path)
    edit_config(folder, tie_word_embeddings=False)
    ids, expected = reference("qwen2")
    model = from_pretrained(folder)
    assert model.config.tie_embeddings
    np.testing.assert_allclose(logits_of(model, ids), expected, rtol=0, atol=TOL)


def test_multimodal_gemma3_loads_its_language_model(tmp_path):
    """model_type gemma3: the text model of text_config, its tensors under
    model.language_model. (transformers 5) or language_model.model. (4); the vision tower
    and projector are skipped by name."""
    for prefix in ("model.language_model.", "language_model.model."):
        folder = copy_fixture("gemma3_text", tmp_path / prefix)
        text = json.loads((folder / "config.json").read_text())
        edit_config(folder, drop=list(text), model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                    text_config=text, vision_config={"model_type": "siglip_vision_model", "hidden_size": 8},
                    mm_tokens_per_image=4)

        def to_multimodal(t, prefix=prefix):
            for name in list(t):
                t[prefix + name.removeprefix("model.")] = t.pop(name)
            vision = "model." if prefix.startswith("model.") else ""
            t[vision + "vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3), np.float32)
            t[vision + "multi_modal_projector.mm_input_projection_weight"] = np.zeros((8, 64), np.float32)
        edit_weights(folder, to_multimodal)
        ids, expected = reference("gemma3_text")
        np.testing.assert_allclose(logits_of(from_pretrained(folder), ids), expected, rtol=0, atol=TOL)


# ---------------------------------------------------------------------- save_pretrained

def read_fixture_tensors(arch: str) -> dict[str, np.ndarray]:
    """Every tensor of a fixture as float32, read by nt."""
    tensors = {}
    for f in FIXTURES.joinpath(arch).glob("model*.safetensors"):
        st = SafetensorsFile(f)
        tensors.update({name: st.read(name, np.float32) for name in st.tensors})
    return tensors


def read_our_files(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a saved folder, read by the safetensors library (the oracle)."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {}
    for f in sorted(folder.glob("model*.safetensors")):
        tensors.update(st_numpy.load_file(str(f)))
    return tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(tmp_path, arch):
    """save_pretrained -> from_pretrained gives the same logits; the safetensors library
    reads nt's files and finds the fixture's tensors (in nt's float32), names and layouts."""
    model = from_pretrained(FIXTURES / arch)
    ids, _ = reference(arch)
    before = logits_of(model, ids)
    model.save_pretrained(tmp_path / "out")
    again = from_pretrained(tmp_path / "out")
    assert again.config == model.config
    np.testing.assert_array_equal(logits_of(again, ids), before)
    ours = read_our_files(tmp_path / "out")
    original = read_fixture_tensors(arch)
    assert set(ours) == set(original)
    for name, value in original.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == value.shape, name
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-6, err_msg=name)   # Gemma: (w + 1) - 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == arch and config["dtype"] == "float32"
    assert not list((tmp_path / "out").glob(".*"))   # no temporary file left behind


def test_sharded_save_and_load(tmp_path):
    model = from_pretrained(FIXTURES / "llama")
    ids, _ = reference("llama")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:   # at most 40 KB of tensors, unless one tensor alone is bigger (the embedding)
        sizes = [t.end - t.begin for t in SafetensorsFile(shard).tensors.values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in read_our_files(folder).values())
    np.testing.assert_array_equal(logits_of(from_pretrained(folder), ids), logits_of(model, ids))
    # saving again unsharded removes the shards, which would otherwise be stale; other files stay
    (folder / "tokenizer.json").write_text("{}")
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    np.testing.assert_array_equal(logits_of(from_pretrained(folder), ids), logits_of(model, ids))


@pytest.mark.parametrize("size,expected", [(123, 123), ("5GB", 5 * 10 ** 9), ("100KB", 10 ** 5),
                                           ("2MiB", 2 * 2 ** 20), ("1.5 GB", 1.5 * 10 ** 9), ("7B", 7)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 potatoes", "", 0, -1, "GB", True, 1.5])
def test_parse_size_refuses(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


def nt_models() -> dict:
    """Random nt models of every kind save_pretrained maps onto a HF class."""
    small = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300, block_size=32)
    return {
        "gpt2": GPT2(GPT2Config(block_size=32, vocab_size=300, n_layer=2, n_head=4, n_embd=64), seed=1),
        "llama": Llama(LlamaConfig(**small, tie_embeddings=False, rope_theta=500000.0,
                                   rope_scaling=(8.0, 1.0, 4.0, 16)), seed=2),
        "mistral": Llama(LlamaConfig(**small, sliding_window=5), seed=3),
        # Qwen2 with every other layer local: expressible through layer_types
        "qwen2": Llama(LlamaConfig(**small, qkv_bias=True, sliding_window=6, global_every=2), seed=4),
        "gemma3_text": Llama(LlamaConfig(**{**small, "n_layers": 3}, head_dim=32, ffn_kind="geglu", qk_norm=True,
                                         post_norms=True, embed_scale=True, sliding_window=4, global_every=3,
                                         rope_theta=1e6, rope_local_theta=1e4, norm_eps=1e-6), seed=5),
    }


def randomize_norms(model) -> None:
    """Norm weights away from 1 (nt's init), so a wrong +1 / -1 would show."""
    flat = model.params.to_flat()
    rng = np.random.default_rng(0)
    for name, t in model.params.items():
        if "norm" in name or name.startswith("ln"):
            o = model.params.offsets[name]
            flat[o:o + t.size] += rng.normal(0, 0.2, t.size)
    model.params.load_flat(flat)


@pytest.mark.parametrize("arch", ARCHS)
def test_nt_models_round_trip(tmp_path, arch):
    model = nt_models()[arch]
    randomize_norms(model)
    ids = np.random.default_rng(1).integers(0, 300, (2, 12))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == arch
    again = from_pretrained(tmp_path)
    assert again.config == model.config if arch == "gpt2" else again.config.__dict__ == {
        **model.config.__dict__, "head_dim": model.config.hs}
    np.testing.assert_allclose(logits_of(again, ids), logits_of(model, ids), rtol=0, atol=1e-5)


def test_float64_round_trip(tmp_path):
    model = GPT2(GPT2Config(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16), dtype=np.float64)
    model.save_pretrained(tmp_path)
    assert SafetensorsFile(tmp_path / "model.safetensors").tensors["transformer.wte.weight"].dtype == "F64"
    again = from_pretrained(tmp_path, dtype=np.float64)
    assert again.params.dtype == np.float64
    np.testing.assert_array_equal(again.params.to_flat(), model.params.to_flat())


@pytest.mark.parametrize("dtype,stored", [("bfloat16", "BF16"), ("float16", "F16"), (np.float16, "F16"),
                                          ("float64", "F64")])
def test_save_in_another_dtype(tmp_path, dtype, stored):
    """The weights are rounded to the dtype asked for (bfloat16 as PyTorch rounds) and
    config.json says which; nt reads them back."""
    model = from_pretrained(FIXTURES / "gemma3_text")
    model.save_pretrained(tmp_path, dtype=dtype)
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == name
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert {t.dtype for t in f.tensors.values()} == {stored}
    exact = {n: f.read(n, np.float32) for n in f.tensors}
    for n, value in read_fixture_tensors("gemma3_text").items():
        if stored == "BF16":
            value = bf16_to_float32(float_to_bf16(value))
        elif stored == "F16":
            value = value.astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(exact[n], value, rtol=0, atol=1e-6 if "norm" in n else 0, err_msg=n)
    ids, expected = reference("gemma3_text")
    np.testing.assert_allclose(logits_of(from_pretrained(tmp_path), ids), expected, rtol=0,
                               atol=0.2 if stored in ("BF16", "F16") else TOL)


def test_save_refuses_a_dtype_that_would_overflow_or_is_unknown(tmp_path):
    model = GPT2(GPT2Config(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16))
    flat = model.params.to_flat()
    flat[model.params.offsets["wpe"] + 3] = 1e5   # past float16's 65504
    model.params.load_flat(flat)
    with pytest.raises(ValueError, match="'transformer.wpe.weight' has values beyond float16's range"):
        model.save_pretrained(tmp_path / "a", dtype="float16")
    model.save_pretrained(tmp_path / "b", dtype="bfloat16")   # bfloat16 has float32's range
    for bad in ("int8", "float8", np.int32, "bf16"):
        with pytest.raises(ValueError, match="dtype must be one of"):
            model.save_pretrained(tmp_path / "c", dtype=bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("options,message", [
    (dict(n_predict=2), "n_predict=2"),
    (dict(norm="layernorm"), "norm='layernorm'"),
    (dict(rope_pairing="interleaved"), "rope_pairing='interleaved'"),
    (dict(qk_norm=True), "neither Gemma-3"),
    (dict(ffn_kind="geglu"), "neither Gemma-3"),
    (dict(sliding_window=4, global_every=2), "global_every=2"),
    (dict(sliding_window=4, rope_local_theta=5000.0), "rope_local_theta"),
])
def test_save_refuses_what_hf_cannot_express(tmp_path, options, message):
    model = Llama(LlamaConfig.preset("llama-tiny", vocab_size=300, **options))
    with pytest.raises(NotImplementedError, match=message):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()   # refused before anything was written


# ---------------------------------------------------------------------- hostile and unsupported folders

def test_missing_config_and_not_a_folder(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json: missing"):
        from_pretrained(folder)
    with pytest.raises(FormatError, match="not a folder"):
        from_pretrained(tmp_path / "nowhere")
    folder = copy_fixture("qwen2", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="no model.safetensors and no model.safetensors.index.json"):
        from_pretrained(folder)


@pytest.mark.parametrize("arch,change,message", [
    ("llama", dict(model_type="bert"), "model_type 'bert' is not supported"),
    ("llama", dict(drop=["model_type"]), "model_type None is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'yarn'"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'linear'"),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "mystery": 1}), "mystery"),
    ("llama", dict(attention_bias=True), "attention_bias=True"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(rope_interleaved=True), "rope_interleaved"),
    ("llama", dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    ("llama", dict(sliding_window=16), "sliding_window"),   # Llama has no sliding window: unknown field
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"],
                   max_window_layers=1), "layer_types"),
    ("gemma3_text", dict(query_pre_attn_scalar=32), "query_pre_attn_scalar=32"),
    ("gemma3_text", dict(drop=["query_pre_attn_scalar"]), "query_pre_attn_scalar=256"),   # transformers' default
    ("gemma3_text", dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    ("gemma3_text", dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("gemma3_text", dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "rope_type 'linear'"),
    ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "one scaling to every layer"),
    ("gpt2", dict(activation_function="gelu"), "activation_function='gelu'"),
    ("gpt2", dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    ("gpt2", dict(n_inner=100), "n_inner=100"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    ("gpt2", dict(n_ctx=64), "n_ctx=64"),
])
def test_unsupported_options_are_refused(tmp_path, arch, change, message):
    folder = copy_fixture(arch, tmp_path)
    edit_config(folder, **change)
    with pytest.raises(NotImplementedError, match=message) as info:
        from_pretrained(folder)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size="64"), "'hidden_size' must be int"),
    (dict(num_hidden_layers=0), "'num_hidden_layers' must be in 1..10000"),
    (dict(num_hidden_layers=10 ** 12), "'num_hidden_layers' must be in 1..10000"),
    (dict(num_hidden_layers=5000), "5000 layers need more tensors than the 21"),
    (dict(num_hidden_layers=3), "missing tensor 'model.layers.2.input_layernorm.weight'"),
    (dict(num_key_value_heads=0), "'num_key_value_heads' must be in 1.."),
    (dict(head_dim=None, num_attention_heads=5), "not divisible by num_attention_heads 5"),
    (dict(vocab_size=2 ** 62), "'vocab_size' must be in 1.."),
    (dict(num_attention_heads=True), "'num_attention_heads' must be int"),
    (dict(rms_norm_eps=-1.0), "'rms_norm_eps' must be a finite positive"),
    (dict(rms_norm_eps=10 ** 400), "'rms_norm_eps' must be a finite positive"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 10 ** 400, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}), "llama3 RoPE needs a positive number factor"),
    (dict(tie_word_embeddings="yes"), "'tie_word_embeddings' must be bool"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "big"}), "rope_theta must be"),
    (dict(rope_parameters=[1, 2]), "'rope_parameters' must be dict"),
    (dict(num_key_value_heads=3), "impossible model"),
])
def test_malformed_config_fields(tmp_path, change, message):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, **change)
    with pytest.raises(FormatError, match=message):
        from_pretrained(folder)


def test_config_that_is_not_json_or_not_an_object(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="must be a JSON object"):
        from_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "llama", "model_type": "gpt2"}')
    with pytest.raises(FormatError, match="duplicate key"):
        from_pretrained(folder)


def test_truncated_and_corrupt_safetensors(tmp_path):
    folder = copy_fixture("qwen2", tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="model.safetensors.*truncated"):
        from_pretrained(folder)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError, match="model.safetensors.*header length"):
        from_pretrained(folder)


@pytest.mark.parametrize("shard,message", [
    ("model-00009-of-00003.safetensors", "missing from"),
    ("../model-00001-of-00003.safetensors", "not a plain file name"),
    ("/etc/passwd", "not a plain file name"),
    ("sub/model-00001-of-00003.safetensors", "not a plain file name"),
    ("..", "not a plain file name"),
    (7, "not a plain file name"),
])
def test_index_naming_a_missing_shard_or_a_path(tmp_path, shard, message):
    folder = copy_fixture("gpt2", tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["transformer.wte.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=message) as info:
        from_pretrained(folder)
    assert "model.safetensors.index.json" in str(info.value)


def test_index_and_shards_must_agree(tmp_path):
    folder = copy_fixture("gpt2", tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "transformer.wte.weight"
    right = index["weight_map"][name]
    wrong = next(f for f in set(index["weight_map"].values()) if f != right)
    index["weight_map"][name] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"'{name}' is listed in '{wrong}', which does not hold it"):
        from_pretrained(folder)
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"{right}: tensor '{name}' is not listed for this shard"):
        from_pretrained(folder)
    index_path.write_text(json.dumps({"weight_map": []}))
    with pytest.raises(FormatError, match="weight_map"):
        from_pretrained(folder)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}),
     r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), config.json makes it \(32, 64\)"),
    (lambda t: t.update({"model.embed_tokens.weight": np.zeros((301, 64), np.float32)}),
     "'model.embed_tokens.weight' has shape"),
    (lambda t: t.update({"model.layers.0.mlp.experts.weight": np.zeros(3, np.float32)}),
     "tensor 'model.layers.0.mlp.experts.weight' is not part of nt's llama model"),
    (lambda t: t.update({"model.layers.2.input_layernorm.weight": np.zeros(64, np.float32)}),
     "'model.layers.2.input_layernorm.weight' is not part"),
    (lambda t: t.update({"lm_head.weight": np.zeros((300, 64), np.float32)}), "'lm_head.weight' differs"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"), "missing tensor 'model.layers.0.self_attn.q_proj.bias'"),
    (lambda t: t.update({"model.norm.weight": np.arange(64, dtype=np.int32)}), "'model.norm.weight' is I32"),
])
def test_bad_tensor_directory(tmp_path, change, message):
    folder = copy_fixture("qwen2", tmp_path)
    edit_weights(folder, change)
    with pytest.raises((FormatError, NotImplementedError), match=message) as info:
        from_pretrained(folder)
    assert "model.safetensors" in str(info.value)


def test_check_finite(tmp_path):
    folder = copy_fixture("qwen2", tmp_path)
    edit_weights(folder, lambda t: t["model.layers.1.self_attn.v_proj.weight"].__setitem__((3, 4), np.nan))
    from_pretrained(folder)   # off by default
    with pytest.raises(FormatError, match="'model.layers.1.self_attn.v_proj.weight' holds 1 non-finite"):
        from_pretrained(folder, check_finite=True)


# ---------------------------------------------------------------------- transformers reads nt's output

@pytest.mark.slow
@pytest.mark.parametrize("source,dtype", [("fixture", None), ("nt", None), ("nt", "bfloat16")])
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_our_save(tmp_path, arch, source, dtype):
    """transformers.AutoModelForCausalLM loads save_pretrained's folder (float32 or
    bfloat16) with no missing or unexpected weights and computes nt's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = from_pretrained(FIXTURES / arch) if source == "fixture" else nt_models()[arch]
    if source == "nt":
        randomize_norms(model)
    ids = np.random.default_rng(2).integers(0, 300, (2, 12))
    model.save_pretrained(tmp_path, max_shard_size="100KB", dtype=dtype)
    if dtype == "bfloat16":   # compare with the rounded weights nt reads back
        model = from_pretrained(tmp_path)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits_of(model, ids), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_any_config_value_loads_or_is_refused_clearly(tmp_path, arch):
    """Every field of config.json left out, or swapped for values of the wrong type or
    range: the folder loads (the value was harmless) or a FormatError / NotImplementedError names
    the field; nothing else escapes (TypeError, OverflowError, a hang)."""
    folder = copy_fixture(arch, tmp_path)
    base = json.loads((folder / "config.json").read_text())
    hostile = [[], {"a": 1}, "x", -1, 0, 10 ** 400, None, True, 1.5]
    variants = [{k: v for k, v in base.items() if k != key} for key in base]   # each field left out
    for key in list(base) + ["rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern"]:
        variants += [{**base, key: value} for value in hostile]
    for config in variants:
        (folder / "config.json").write_text(json.dumps(config))
        try:
            from_pretrained(folder)
        except (FormatError, NotImplementedError):
            pass
