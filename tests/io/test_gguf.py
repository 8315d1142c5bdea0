"""GGUF reader, writer, dequantisers and quantisers (nt.io.gguf: G) and nt models to and from
GGUF (nt.models.gguf: M) against the `gguf` package (llama.cpp's own Python implementation, a
test oracle only). Hostile files: test_gguf_hostile.py."""
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from nt.io import FormatError  # noqa: E402
from nt.io import gguf as G  # noqa: E402
from nt.models import GPT2, GPT2Config  # noqa: E402
from nt.models import gguf as M  # noqa: E402

SIMPLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of the f16 scale fields in each K-quant block
K_HALVES = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _oracle_file(path, tensors, metadata=()):
    """Write a file with gguf.GGUFWriter: tensors name -> (stored array, raw ggml type or None)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, key, value in metadata:
        getattr(w, add)(key, value)
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _stored(x, qtype):
    """x as the gguf package stores it for `qtype`: (array for add_tensor, raw_dtype)."""
    if qtype == "F32":
        return x, None
    if qtype == "F16":
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, Q[qtype]), Q[qtype]


def _bits_equal(a, b):
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                                                  np.asarray(b, np.float32).view(np.uint32))


def _random_kquant_blocks(qtype, n_blocks, rng):
    """Random bytes are valid K-quant blocks once their f16 scales are finite."""
    _, ts = gguf.constants.GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for off in K_HALVES[qtype]:
        raw[:, off:off + 2] = rng.uniform(-4, 4, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw


# ---------------------------------------------------------------------- reading

def test_metadata_of_every_type(tmp_path):
    meta = [("add_uint8", "k.u8", 200), ("add_int8", "k.i8", -5), ("add_uint16", "k.u16", 60000),
            ("add_int16", "k.i16", -300), ("add_uint32", "k.u32", 4_000_000_000), ("add_int32", "k.i32", -7),
            ("add_float32", "k.f32", 1.5), ("add_bool", "k.bool", True), ("add_string", "k.str", "héllo ✓"),
            ("add_uint64", "k.u64", 2 ** 63 + 5), ("add_int64", "k.i64", -2 ** 40), ("add_float64", "k.f64", 0.1),
            ("add_array", "k.ints", [1, -2, 3]), ("add_array", "k.floats", [0.5, 1.25]),
            ("add_array", "k.strs", ["a", "", "ccc"]), ("add_array", "k.nested", [["x", "y"], ["z"]])]
    _oracle_file(tmp_path / "m.gguf", {}, meta)
    f = G.GGUFFile(tmp_path / "m.gguf")
    assert f.version == 3 and f.tensors == {}
    for _, key, value in meta:
        got = f.metadata[key]
        if isinstance(got, np.ndarray):
            assert got.tolist() == value
        else:
            assert got == value and type(got) is type(value), key
    assert f.value_types["k.u64"] == "uint64" and f.value_types["k.f32"] == "float32"
    assert f.value_types["k.strs"] == "array[string]" and f.value_types["k.nested"] == "array[array]"
    assert f.metadata["general.architecture"] == "llama"


@pytest.mark.parametrize("qtype", SIMPLE)
def test_dequantize_matches_gguf_exactly(tmp_path, qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 3, 64)) * rng.uniform(0.01, 5, (2, 3, 1))).astype(np.float32)
    x[0, 0] = 0.0   # an all-zero block (d = 0)
    stored, raw_dtype = _stored(x, qtype)
    _oracle_file(tmp_path / "t.gguf", {"w": (stored, raw_dtype), "v": (x[0, 0, :32].copy(), None)})
    f = G.GGUFFile(tmp_path / "t.gguf")
    assert f.tensors["w"] == ((2, 3, 64), qtype)
    assert f.tensor_infos["w"].ne == (64, 3, 2)        # ggml order: fastest first
    assert np.array_equal(f.raw("w"), np.asarray(stored).view(np.uint8).reshape(-1))
    ours = f.dequantize("w")
    ref = gguf.quants.dequantize(np.asarray(stored).view(np.uint8) if raw_dtype else stored, Q[qtype])
    assert _bits_equal(ours, np.asarray(ref, np.float32).reshape(2, 3, 64))
    if qtype == "F32":
        assert np.array_equal(ours, x)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_dequantize_matches_gguf_exactly(tmp_path, qtype):
    rng = np.random.default_rng(2)
    raw = _random_kquant_blocks(qtype, 2 * 3, rng).reshape(2, -1)   # 2 rows of 3 super-blocks
    _oracle_file(tmp_path / "k.gguf", {"w": (raw, Q[qtype])})
    f = G.GGUFFile(tmp_path / "k.gguf")
    assert f.tensors["w"] == ((2, 768), qtype)
    assert _bits_equal(f.dequantize("w"), gguf.quants.dequantize(raw, Q[qtype]))
    # and block by block, through the module-level decoder
    for b in range(6):
        block = raw.reshape(6, -1)[b]
        assert _bits_equal(G.dequantize(block, qtype, (256,)), gguf.quants.dequantize(block[None], Q[qtype])[0])


def test_shape_convention_matches_gguf_reader(tmp_path):
    """GGUFReader reports ne (fastest first); we report NumPy order, the reverse."""
    x = np.arange(2 * 3 * 32, dtype=np.float32).reshape(2, 3, 32)
    _oracle_file(tmp_path / "s.gguf", {"a": (x, None), "b": _stored(x[0], "Q8_0")})
    ref = {t.name: t for t in gguf.GGUFReader(tmp_path / "s.gguf").tensors}
    f = G.GGUFFile(tmp_path / "s.gguf")
    for name in ("a", "b"):
        assert f.tensor_infos[name].ne == tuple(ref[name].shape.tolist())
        assert f.tensors[name][0] == tuple(reversed(ref[name].shape.tolist()))
        assert f.tensor_infos[name].offset == ref[name].data_offset
    assert np.array_equal(f.dequantize("a")[1, 2], x[1, 2])   # row-major: last axis contiguous


# ---------------------------------------------------------------------- quantisers

@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_quantize_matches_gguf_bytes(qtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 96)) * rng.uniform(1e-3, 50, (7, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 2.5            # ties in Q8_0's rounding and Q4_0's all-equal block
    x[2, 5] = -x[2].__abs__().max() * 3   # a block whose largest magnitude is negative
    ours = G.quantize(x, qtype)
    ref = np.asarray(gguf.quants.quantize(x, Q[qtype])).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype,levels", [("Q8_0", 127), ("Q4_0", 8)])
def test_quantize_round_trip_error_bound(qtype, levels):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 256)) * rng.uniform(1e-3, 10, (16, 1))).astype(np.float32)
    y = G.dequantize(G.quantize(x, qtype), qtype, x.shape)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    step = amax / levels
    err = np.abs(y - x).reshape(-1, 32)
    # half a step from rounding (a whole one where Q4_0 clips +8 to +7), plus f16 rounding of d
    bound = step * (0.5 if qtype == "Q8_0" else 1.0) + amax * 2 ** -10
    assert np.all(err <= bound)
    assert err.mean() < (step * 0.3).mean()


# ---------------------------------------------------------------------- writing

def test_write_gguf_read_by_gguf_and_by_us(tmp_path):
    rng = np.random.default_rng(5)
    metadata = {
        "general.architecture": "llama", "k.uint": 7, "k.neg": -3, "k.big": 2 ** 40, "k.float": 0.25,
        "k.bool": False, "k.str": "tokens ✓", "k.u8": np.uint8(9), "k.i16": np.int16(-2), "k.u64": np.uint64(3),
        "k.f64": np.float64(1e-300), "k.arr_i32": np.array([1, 2, 3], np.int32), "k.arr_f32": [0.5, 2.0],
        "k.arr_str": ["a", "bc"], "k.arr_bool": [True, False], "k.nested": [["a"], ["b", "c"]],
        "k.ints": [1, 2 ** 40],
    }
    x = rng.standard_normal((3, 256)).astype(np.float32)   # 256: one block of the K/ternary formats (TQ2_0)
    tensors = {f"w.{t}": (x, t) for t in G.WRITE_TYPES}
    tensors["bias"] = (rng.standard_normal(5).astype(np.float32), "F32")
    path = tmp_path / "w.gguf"
    G.write_gguf(path, metadata, tensors)
    assert not os.path.exists(str(path) + ".tmp")

    r = gguf.GGUFReader(path)
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(metadata)
    assert fields["k.uint"].types == [gguf.GGUFValueType.UINT32] and fields["k.uint"].contents() == 7
    assert fields["k.neg"].types == [gguf.GGUFValueType.INT32] and fields["k.neg"].contents() == -3
    assert fields["k.big"].types == [gguf.GGUFValueType.UINT64]
    assert fields["k.f64"].types == [gguf.GGUFValueType.FLOAT64] and fields["k.f64"].contents() == 1e-300
    assert fields["k.arr_str"].contents() == ["a", "bc"]
    V = gguf.GGUFValueType   # (its reader flattens nested arrays' contents: check the types)
    assert fields["k.nested"].types == [V.ARRAY, V.ARRAY, V.STRING]
    assert fields["k.ints"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64]
    for t in r.tensors:
        if t.name.startswith("w."):
            qtype = t.name[2:]
            assert t.tensor_type == Q[qtype] and t.shape.tolist() == [256, 3]
            ref = np.asarray(gguf.quants.quantize(x, Q[qtype])).view(np.uint8).reshape(-1)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ref)

    f = G.GGUFFile(path)
    assert f.metadata["k.str"] == "tokens ✓" and f.metadata["k.nested"] == [["a"], ["b", "c"]]
    assert f.value_types["k.u8"] == "uint8" and f.value_types["k.arr_bool"] == "array[bool]"
    assert np.array_equal(f.dequantize("w.F32"), x) and np.array_equal(f.dequantize("bias"), tensors["bias"][0])
    assert all(info.offset % 32 == 0 for info in f.tensor_infos.values())


def test_write_gguf_alignment_and_atomicity(tmp_path):
    path = tmp_path / "a.gguf"
    x = np.ones((2, 32), np.float32)
    G.write_gguf(path, {"general.architecture": "x"}, {"a": (x[0, :3], "F32"), "b": (x, "Q8_0")}, alignment=64)
    f = G.GGUFFile(path)
    assert f.alignment == 64 and f.metadata["general.alignment"] == 64
    assert all(info.offset % 64 == 0 for info in f.tensor_infos.values())
    assert gguf.GGUFReader(path).alignment == 64
    before = path.read_bytes()
    with pytest.raises(ValueError, match="multiple of 32"):
        G.write_gguf(path, {}, {"bad": (np.ones((2, 33), np.float32), "Q4_0")})
    with pytest.raises(ValueError, match="writes"):
        G.write_gguf(path, {}, {"bad": (x, "Q4_K")})
    with pytest.raises(ValueError, match="power of two"):
        G.write_gguf(path, {}, {}, alignment=48)
    assert path.read_bytes() == before   # a failed write leaves the old file untouched


# ---------------------------------------------------------------------- matmul on blocks

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("N", [1, 5])
def test_quantized_matmul_matches_dequantize_then_matmul(qtype, N):
    rng = np.random.default_rng(6)
    W = rng.standard_normal((48, 96)).astype(np.float32)
    x = rng.standard_normal((N, 96)).astype(np.float32)
    w = G.quantize(W, qtype)
    ref = x.astype(np.float64) @ G.dequantize(w, qtype, W.shape).T.astype(np.float64)
    out = G.quantized_matmul(x, w, qtype)
    assert out.shape == (N, 48)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_quantized_matmul_rejects_bad_shapes():
    w = G.quantize(np.ones((4, 64), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="w must be"):
        G.quantized_matmul(np.ones((1, 32), np.float32), w, "Q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        G.quantized_matmul(np.ones((1, 65), np.float32), w, "Q8_0")
    with pytest.raises(ValueError, match="supports"):
        G.quantized_matmul(np.ones((1, 64), np.float32), w, "Q5_0")


# ---------------------------------------------------------------------- nt models

def _tiny_gpt2():
    return GPT2(GPT2Config.preset("tiny", vocab_size=300), seed=3)


@pytest.mark.parametrize("dtype,tol", [("F32", 0.0), ("F16", 2e-3), ("BF16", 2e-2), ("Q8_0", 2e-2), ("Q4_0", 0.3)])
def test_gpt2_export_import_logits(tmp_path, dtype, tol):
    model = _tiny_gpt2()
    idx = np.random.default_rng(7).integers(0, 300, (2, 16)).astype(np.int32)
    ref = model(idx)[0].copy()
    path = tmp_path / f"gpt2-{dtype}.gguf"
    M.write(path, model, dtype)
    back = M.load(path)
    assert back.config == model.config
    out = back(idx)[0]
    if dtype == "F32":
        assert np.array_equal(out, ref)
    else:
        assert np.abs(out - ref).max() <= tol * np.abs(ref).max()


def test_gpt2_export_uses_llama_cpp_names_and_shapes(tmp_path):
    model = _tiny_gpt2()
    C, L, V = 64, 2, 300
    M.write(tmp_path / "g.gguf", model, "Q8_0")
    r = gguf.GGUFReader(tmp_path / "g.gguf")
    ne = {t.name: t.shape.tolist() for t in r.tensors}
    types = {t.name: t.tensor_type for t in r.tensors}
    assert ne["token_embd.weight"] == [C, V] and ne["output.weight"] == [C, V]
    assert ne["position_embd.weight"] == [C, 64]
    assert ne["blk.1.attn_qkv.weight"] == [C, 3 * C] and ne["blk.1.attn_qkv.bias"] == [3 * C]
    assert ne["blk.0.attn_output.weight"] == [C, C] and ne["blk.0.ffn_up.weight"] == [C, 4 * C]
    assert ne["blk.0.ffn_down.weight"] == [4 * C, C] and ne["output_norm.bias"] == [C]
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0 and types["blk.0.attn_norm.weight"] == Q.F32
    assert len(ne) == 2 + 12 * L + 3
    assert r.fields["general.architecture"].contents() == "gpt2"
    assert r.fields["gpt2.block_count"].contents() == L and r.fields["gpt2.embedding_length"].contents() == C
    assert r.fields["gpt2.attention.head_count"].contents() == 4
    assert r.fields["general.file_type"].contents() == 7


def test_gpt2_load_from_gguf_package_file(tmp_path):
    """A GPT-2 file written by llama.cpp's own writer gives nt the same logits."""
    model = _tiny_gpt2()
    meta, arrays = M._gpt2_export(model)
    w = gguf.GGUFWriter(str(tmp_path / "o.gguf"), "gpt2")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(256)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-5)
    for name, a in arrays.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from nt.models import from_gguf
    idx = np.arange(20, dtype=np.int32).reshape(2, 10)
    assert np.array_equal(from_gguf(tmp_path / "o.gguf")(idx)[0], model(idx)[0])


def test_load_rejects_incomplete_models(tmp_path):
    G.write_gguf(tmp_path / "x.gguf", {"general.architecture": "mamba"}, {})
    with pytest.raises(FormatError, match="'mamba' is not supported"):
        M.load(tmp_path / "x.gguf")
    G.write_gguf(tmp_path / "y.gguf", {"general.architecture": "gpt2", "gpt2.embedding_length": 64}, {})
    with pytest.raises(FormatError, match="missing metadata 'gpt2.attention.head_count'"):
        M.load(tmp_path / "y.gguf")


def _tiny_llama(**kw):
    from nt.models import Llama, LlamaConfig
    return Llama(LlamaConfig.preset("llama-tiny", vocab_size=300, rope_theta=5000.0, **kw), seed=4)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype,tol", [("F32", 1e-6), ("Q8_0", 2e-2)])
def test_llama_export_import_logits(tmp_path, pairing, tie, dtype, tol):
    """HF-style ("half") models are stored with llama.cpp's interleaved q/k rows and come back
    as interleaved models: the same function, so the same logits."""
    model = _tiny_llama(rope_pairing=pairing, tie_embeddings=tie)
    idx = np.random.default_rng(8).integers(0, 300, (2, 16)).astype(np.int32)
    ref = model(idx)[0].copy()
    M.write(tmp_path / "l.gguf", model, dtype)
    back = M.load(tmp_path / "l.gguf")
    assert back.config.rope_pairing == "interleaved" and back.config.tie_embeddings == tie
    assert (back.config.dim, back.config.n_kv_heads, back.config.ffn_hidden) == (64, 2, 192)
    assert np.abs(back(idx)[0] - ref).max() <= tol * np.abs(ref).max()


def test_llama_export_uses_llama_cpp_names_and_shapes(tmp_path):
    model = _tiny_llama(tie_embeddings=False)
    M.write(tmp_path / "l.gguf", model, "F16")
    r = gguf.GGUFReader(tmp_path / "l.gguf")
    ne = {t.name: t.shape.tolist() for t in r.tensors}
    assert ne["token_embd.weight"] == [64, 300] and ne["output.weight"] == [64, 300]
    assert ne["blk.0.attn_q.weight"] == [64, 64] and ne["blk.0.attn_k.weight"] == [64, 32]
    assert ne["blk.1.attn_v.weight"] == [64, 32] and ne["blk.1.attn_output.weight"] == [64, 64]
    assert ne["blk.0.ffn_gate.weight"] == [64, 192] and ne["blk.0.ffn_up.weight"] == [64, 192]
    assert ne["blk.0.ffn_down.weight"] == [192, 64] and ne["output_norm.weight"] == [64]
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama" and f["llama.attention.head_count_kv"] == 2
    assert f["llama.feed_forward_length"] == 192 and f["llama.rope.freq_base"] == 5000.0
    assert r.fields["llama.attention.layer_norm_rms_epsilon"].types == [gguf.GGUFValueType.FLOAT32]
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(_write_tied(tmp_path)).tensors}


def _write_tied(tmp_path):
    M.write(tmp_path / "tied.gguf", _tiny_llama(), "F32")
    return tmp_path / "tied.gguf"


def test_from_gguf_llama_file_written_by_gguf_package(tmp_path):
    """nt.models.from_gguf on a file from llama.cpp's writer: same logits as an nt Llama
    (interleaved pairing, as llama.cpp's llama arch) built from the same weights."""
    from nt.models import from_gguf
    model = _tiny_llama(rope_pairing="interleaved", tie_embeddings=False)
    _, arrays = M._llama_export(model)
    w = gguf.GGUFWriter(str(tmp_path / "o.gguf"), "llama")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(192)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for name, a in arrays.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    idx = np.arange(30, dtype=np.int32).reshape(2, 15)
    # not bitwise: the file holds eps as float32 (1e-5 -> 9.99999975e-06)
    np.testing.assert_allclose(from_gguf(tmp_path / "o.gguf")(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-6)


def test_llama_unsupported_features_are_refused(tmp_path):
    with pytest.raises(ValueError, match="post_norms"):
        M.write(tmp_path / "x.gguf", _tiny_llama(post_norms=True), "F32")
    G.write_gguf(tmp_path / "r.gguf", {"general.architecture": "llama"},
                 {"rope_freqs.weight": (np.ones(16, np.float32), "F32")})
    with pytest.raises(FormatError, match="RoPE scaling"):
        M.load(tmp_path / "r.gguf")
