"""Corrupt and hostile GGUF files: every one must raise nt.io.FormatError naming the file,
the key or tensor and the byte offset; never crash, hang or allocate what the file can't hold."""
import struct
import tempfile
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nt.io import FormatError
from nt.io import gguf as G
from nt.models import gguf as M


def _s(text) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name, ne, tid: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, tid, offset)


def _build(kvs=(), tis=(), data=b"", version=3, n_kv=None, n_t=None, magic=b"GGUF", pad=True) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tis) if n_t is None else n_t, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tis)
    return head + bytes(-len(head) % 32 if pad else 0) + data


def _raises(tmp_path, content: bytes, *fragments: str) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(FormatError) as e:
        f = G.GGUFFile(path)
        for name in f:
            f.dequantize(name)
    msg = str(e.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


F32_4x32 = _ti("w", [32, 4], 0, 0)
DATA = np.arange(128, dtype="<f4").tobytes()


def test_valid_baseline(tmp_path):
    (tmp_path / "ok.gguf").write_bytes(_build([_kv("k", 4, struct.pack("<I", 7))], [F32_4x32], DATA))
    f = G.GGUFFile(tmp_path / "ok.gguf")
    assert f.metadata == {"k": 7} and np.array_equal(f.dequantize("w").reshape(-1), np.arange(128))
    (tmp_path / "v2.gguf").write_bytes(_build([], [F32_4x32], DATA, version=2))   # same layout as v3
    assert G.GGUFFile(tmp_path / "v2.gguf").version == 2


@pytest.mark.parametrize("content,fragments", [
    (b"", ["bad magic", "byte 0"]),
    (b"GGML" + bytes(20), ["bad magic", "not a GGUF file"]),
    (_build(version=1), ["unsupported GGUF version 1", "v1"]),
    (_build(version=7), ["unsupported GGUF version 7", "byte 4"]),
    (b"GGUF" + struct.pack(">I", 3) + bytes(16), ["big-endian"]),
    (b"GGUF" + struct.pack("<I", 3) + bytes(4), ["tensor count", "byte 8", "needs 8 bytes"]),
])
def test_bad_header(tmp_path, content, fragments):
    _raises(tmp_path, content, *fragments)


def test_absurd_counts_and_lengths(tmp_path):
    _raises(tmp_path, _build(n_t=2 ** 62), "tensor count", "count 4611686018427387904 cannot fit", "byte 8")
    _raises(tmp_path, _build(n_kv=2 ** 64 - 1), "metadata count", "byte 16")
    _raises(tmp_path, _build([struct.pack("<Q", 2 ** 63) + b"k"]), "metadata key #0 (string length)", "byte 24")
    _raises(tmp_path, _build([_kv("name", 8, struct.pack("<Q", 10 ** 12) + b"abc")]),
            "metadata 'name' (string length)", "cannot fit")
    _raises(tmp_path, _build([_kv("arr", 9, struct.pack("<IQ", 6, 2 ** 61))]), "metadata 'arr' (array length)")
    _raises(tmp_path, _build([_kv("arr", 9, struct.pack("<IQ", 8, 10 ** 9) + _s("x"))]), "'arr' (array length)")
    _raises(tmp_path, _build([_kv("arr", 9, struct.pack("<IQ", 9, 2 ** 40))]), "'arr' (array length)")
    _raises(tmp_path, _build([_kv("t", 10, b"abc")], pad=False), "metadata 't'", "needs 8 bytes", "byte 37")


def test_bad_metadata_values(tmp_path):
    _raises(tmp_path, _build([_kv("k", 13, b"")]), "metadata 'k'", "unknown value type 13", "byte 33")
    _raises(tmp_path, _build([_kv("k", 9, struct.pack("<IQ", 77, 1))]), "unknown array element type 77")
    nested = struct.pack("<IQ", 9, 1) * 20 + struct.pack("<IQ", 4, 0)
    _raises(tmp_path, _build([_kv("deep", 9, nested)]), "metadata 'deep'", "nested deeper than 16")
    _raises(tmp_path, _build([_kv(b"\xff\xfe", 4, bytes(4))]), "metadata key #0", "not valid UTF-8", "byte 24")
    _raises(tmp_path, _build([_kv("s", 8, _s(b"\xc3("))]), "metadata 's'", "not valid UTF-8")
    two = [_kv("k", 4, bytes(4)), _kv("k", 4, bytes(4))]
    _raises(tmp_path, _build(two), "metadata key 'k'", "duplicate key")
    for payload in (struct.pack("<I", 48), struct.pack("<I", 0)):
        _raises(tmp_path, _build([_kv("general.alignment", 4, payload)]), "general.alignment", "power of two")
    _raises(tmp_path, _build([_kv("general.alignment", 10, struct.pack("<Q", 64))]), "general.alignment", "uint64")


def test_bad_tensor_directory(tmp_path):
    _raises(tmp_path, _build([], [_ti("w", [32, 1, 1, 1, 1], 0, 0)]), "tensor 'w'", "5 dimensions", "byte 33")
    _raises(tmp_path, _build([], [_ti("w", [2 ** 62, 2 ** 62], 0, 0)], DATA), "tensor 'w'", "past the end")
    _raises(tmp_path, _build([], [_ti("w", [2 ** 64 - 1], 0, 0)], DATA), "tensor 'w'", "dimension out of range")
    _raises(tmp_path, _build([], [_ti("w", [32, 4], 0, 2 ** 40)], DATA), "tensor 'w'", "past the end")
    _raises(tmp_path, _build([], [F32_4x32], DATA[:-4]), "tensor 'w'", "entry at byte 24",
            "runs past the end of the file")
    _raises(tmp_path, _build([], [_ti("w", [32, 4], 99, 0)], DATA), "tensor 'w'", "unknown ggml type id 99")
    _raises(tmp_path, _build([], [_ti("w", [32, 3], 0, 4)], DATA), "tensor 'w'", "not a multiple of the alignment 32")
    _raises(tmp_path, _build([], [_ti("w", [48, 1], 8, 0)], DATA), "tensor 'w'", "Q8_0's block size 32")
    _raises(tmp_path, _build([], [F32_4x32, F32_4x32], DATA), "tensor 'w'", "duplicate tensor name")
    _raises(tmp_path, _build([], [_ti(b"\x80", [32], 0, 0)], DATA), "tensor #0 name", "not valid UTF-8")
    _raises(tmp_path, _build([], [_s("w") + struct.pack("<I", 2) + bytes(4)], pad=False),
            "tensor 'w' (dims)", "needs 16 bytes", "byte 37")


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    msg = _raises(tmp_path, _build([], [_ti("w", [256], 16, 0)], bytes(66)), "tensor 'w'", "IQ2_XXS")
    assert "supported" in msg


# ---------------------------------------------------------------------- fuzz

def _base_file() -> bytes:
    """A small valid file: metadata of every kind, one block of every dequantisable type
    (random bytes: any bit pattern is a valid block, NaN/inf scales included)."""
    rng = np.random.default_rng(0)
    kvs = [_kv("general.architecture", 8, _s("gpt2")), _kv("n", 4, struct.pack("<I", 3)),
           _kv("neg", 5, struct.pack("<i", -1)), _kv("f", 6, struct.pack("<f", 0.5)),
           _kv("b", 7, b"\x01"), _kv("u64", 10, struct.pack("<Q", 9)), _kv("d", 12, struct.pack("<d", 0.1)),
           _kv("ints", 9, struct.pack("<IQ3h", 3, 3, 1, 2, 3)),
           _kv("strs", 9, struct.pack("<IQ", 8, 2) + _s("a") + _s("bc")),
           _kv("nested", 9, struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 8, 1) + _s("x")
               + struct.pack("<IQ", 8, 2) + _s("y") + _s("z"))]
    tis, data = [], b""
    for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K"]:
        tid = G.GGML_TYPE_IDS[name]
        _, bs, ts = G.GGML_TYPES[tid]
        n = max(bs, 8)
        tis.append(_ti(name, [n], tid, len(data)))
        block = rng.integers(0, 256, n // bs * ts, dtype=np.uint8).tobytes()
        data += block + bytes(-len(block) % 32)
    return _build(kvs, tis, data)


BASE = _base_file()
INTERESTING = [0, 1, 3, 4, 31, 32, 255, 2 ** 16, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64 - 1]
_mutation = st.one_of(
    st.tuples(st.just("xor"), st.integers(0, len(BASE) - 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(BASE)), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.integers(0, len(BASE) - 1), st.integers(1, 40)),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE) - 1), st.just(0)),
    st.tuples(st.just("u64"), st.integers(0, len(BASE) - 8), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u32"), st.integers(0, len(BASE) - 4), st.sampled_from(INTERESTING[:10])),
)
_WORKDIR = tempfile.TemporaryDirectory()
_counter = [0]


def _mutate(data: bytearray, op) -> bytearray:
    kind, pos, arg = op
    pos = min(pos, len(data))
    if kind == "xor" and pos < len(data):
        data[pos] ^= arg
    elif kind == "insert":
        data[pos:pos] = arg
    elif kind == "delete":
        del data[pos:pos + arg]
    elif kind == "truncate":
        del data[pos:]
    elif kind == "u64" and pos + 8 <= len(data):
        data[pos:pos + 8] = struct.pack("<Q", arg)
    elif kind == "u32" and pos + 4 <= len(data):
        data[pos:pos + 4] = struct.pack("<I", arg & 0xFFFFFFFF)
    return data


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(_mutation, min_size=1, max_size=3))
def test_fuzz_mutated_files_read_or_raise_format_error(ops):
    data = bytearray(BASE)
    for op in ops:
        data = _mutate(data, op)
    _counter[0] += 1
    path = Path(_WORKDIR.name) / f"f{_counter[0]}.gguf"
    path.write_bytes(bytes(data))
    threads = numba.get_num_threads()
    numba.set_num_threads(1)   # tiny tensors: a parallel launch would cost more than the work
    try:
        with G.GGUFFile(path) as f:
            for name in f:
                out = f.dequantize(name)
                assert out.shape == f.tensors[name][0] and out.dtype == np.float32
            assert isinstance(f.metadata, dict)
    except FormatError as e:
        assert str(path) in str(e)
    finally:
        numba.set_num_threads(threads)
        path.unlink()


# ---------------------------------------------------------------------- hostile models (nt.models.gguf)
# Small valid GPT-2 and Llama files, their metadata then made hostile one key at a time:
# every one is refused with a FormatError naming the key or tensor, before a model exists.

def _llama_parts():
    from nt.models import Llama, LlamaConfig
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=300, rope_pairing="interleaved", tie_embeddings=False)
    return M._llama_export(Llama(cfg, seed=1))


def _gpt2_parts():
    from nt.models import GPT2, GPT2Config
    return M._gpt2_export(GPT2(GPT2Config.preset("tiny", vocab_size=300), seed=1))


def _model_file(tmp_path, parts, changes=None, drop=(), extra=None) -> Path:
    """parts = (metadata, arrays) of an export; `changes` sets keys (None deletes one),
    `drop` removes tensors, `extra` adds tensors. All tensors are written as F32."""
    meta, arrays = parts
    meta = {**meta, "tokenizer.ggml.model": "none"}
    for key, v in (changes or {}).items():
        if v is None:
            meta.pop(key)
        else:
            meta[key] = v
    tensors = {n: (a, "F32") for n, a in {**arrays, **(extra or {})}.items() if n not in drop}
    path = tmp_path / "model.gguf"
    G.write_gguf(path, meta, tensors)
    return path


def _refused_fast(path, *fragments, **load_kw) -> str:
    """Loading `path` raises FormatError naming the file and every fragment, within a
    fraction of a second and without allocating more than a few MiB."""
    import time
    import tracemalloc
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError) as e:
            M.load(path, **load_kw)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert seconds < 0.5 and peak < 16 * 2 ** 20, (seconds, peak)
    return msg


def test_valid_model_files_load(tmp_path):
    """The baseline the hostile variants below start from."""
    assert M.load(_model_file(tmp_path, _llama_parts())).config.n_layers == 2
    assert M.load(_model_file(tmp_path, _gpt2_parts())).config.n_layer == 2


@pytest.mark.parametrize("keep_quantized", [False, True])
def test_block_count_is_bounded_by_the_directory(tmp_path, keep_quantized):
    """10**6 layers would be tens of GiB (or minutes of names): the file lists 2 layers of tensors."""
    path = _model_file(tmp_path, _llama_parts(), {"llama.block_count": 10 ** 6})
    _refused_fast(path, "'llama.block_count'", "9000000 tensors", "entry at byte", keep_quantized=keep_quantized)
    path = _model_file(tmp_path, _gpt2_parts(), {"gpt2.block_count": np.uint64(2 ** 64 - 1)})
    _refused_fast(path, "'gpt2.block_count'")
    # fewer layers than the file holds: the extra layers are tensors nt does not know
    _refused_fast(_model_file(tmp_path, _llama_parts(), {"llama.block_count": 1}), "'blk.1.", "not part of")


def test_context_length_is_checked(tmp_path):
    """GPT-2's (T, C) position table must be the file's position_embd; a Llama has no table,
    so an absurd context is refused by its size."""
    path = _model_file(tmp_path, _gpt2_parts(), {"gpt2.context_length": np.uint64(2 ** 64 - 1)})
    _refused_fast(path, "'position_embd.weight'", "(64, 64)", str(2 ** 64 - 1))
    _refused_fast(_model_file(tmp_path, _gpt2_parts(), {"gpt2.context_length": 65}), "'position_embd.weight'")
    path = _model_file(tmp_path, _llama_parts(), {"llama.context_length": np.uint64(2 ** 40)})
    _refused_fast(path, "'llama.context_length'", "limit")
    _refused_fast(_model_file(tmp_path, _llama_parts(), {"llama.context_length": 0}), "'llama.context_length'",
                  "positive")


@pytest.mark.parametrize("key,value,fragment", [
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "finite positive"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, "finite positive"),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, "finite positive"),
    ("llama.rope.freq_base", 0.0, "finite positive"),
    ("llama.rope.freq_base", float("inf"), "finite positive"),
    ("llama.rope.freq_base", np.float64("nan"), "finite positive"),
    ("llama.attention.head_count", 6, "do not divide the width 64"),
    ("llama.attention.head_count_kv", 3, "do not divide the 4 query heads"),
    ("llama.attention.head_count_kv", 0, "positive"),
    ("llama.embedding_length", 0, "positive"),
    ("llama.feed_forward_length", np.int32(-192), "positive"),
    ("llama.attention.value_length", 8, "distinct key/value head sizes"),
    ("llama.rope.dimension_count", 8, "partial RoPE"),
    ("llama.vocab_size", 301, "token_embd.weight has 300 rows"),
    ("llama.rope.scaling.factor", 4.0, "RoPE scaling"),
    ("llama.rope.scaling.type", "yarn", "RoPE scaling"),
])
def test_llama_metadata_that_makes_no_sense_is_refused_at_load(tmp_path, key, value, fragment):
    _refused_fast(_model_file(tmp_path, _llama_parts(), {key: value}), repr(key), fragment)


@pytest.mark.parametrize("key,value,fragment", [
    ("gpt2.attention.layer_norm_epsilon", float("nan"), "finite positive"),
    ("gpt2.attention.layer_norm_epsilon", 1e-6, "uses 1e-05"),
    ("gpt2.attention.head_count", 5, "do not divide the width 64"),
    ("gpt2.feed_forward_length", 128, "4*C = 256"),
    ("gpt2.embedding_length", np.int64(-64), "positive"),
])
def test_gpt2_metadata_that_makes_no_sense_is_refused_at_load(tmp_path, key, value, fragment):
    _refused_fast(_model_file(tmp_path, _gpt2_parts(), {key: value}), repr(key), fragment)


@pytest.mark.parametrize("parts,key,value", [
    (_llama_parts, "general.architecture", ["llama"]),            # an array where a string belongs
    (_llama_parts, "llama.embedding_length", "64"),               # a string where a number belongs
    (_llama_parts, "llama.attention.head_count_kv", True),        # a bool where an int belongs
    (_llama_parts, "llama.block_count", 2.0),                     # a float where an int belongs
    (_llama_parts, "llama.rope.freq_base", "10000"),
    (_llama_parts, "llama.attention.head_count", np.array([4, 4], np.int32)),   # per-layer counts
    (_llama_parts, "llama.rope.scaling.type", np.array([1, 2], np.int32)),
    (_gpt2_parts, "gpt2.context_length", [64]),
])
def test_metadata_of_the_wrong_type_is_refused(tmp_path, parts, key, value):
    _refused_fast(_model_file(tmp_path, parts(), {key: value}), repr(key), "must be")


def test_missing_metadata_is_named(tmp_path):
    _refused_fast(_model_file(tmp_path, _llama_parts(), {"llama.attention.layer_norm_rms_epsilon": None}),
                  "missing metadata 'llama.attention.layer_norm_rms_epsilon'")
    _refused_fast(_model_file(tmp_path, _llama_parts(), {"general.architecture": None}),
                  "missing metadata 'general.architecture'")


def test_tensor_directory_is_checked_whole_before_building(tmp_path):
    llama, gpt2 = _llama_parts(), _gpt2_parts()
    _refused_fast(_model_file(tmp_path, llama, drop=["blk.1.ffn_down.weight"]), "missing tensor 'blk.1.ffn_down.weight'")
    extra = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
    _refused_fast(_model_file(tmp_path, llama, extra=extra), "'blk.0.attn_q.bias'", "not part of nt's llama model")
    bad_shape = {"blk.1.ffn_up.weight": np.zeros((190, 64), np.float32)}
    _refused_fast(_model_file(tmp_path, llama, extra=bad_shape), "'blk.1.ffn_up.weight'", "(190, 64)", "(192, 64)")
    # GPT-2's output.weight is documented as ignored (tied), but must still have its shape
    M.load(_model_file(tmp_path, gpt2, drop=["output.weight"]))
    bad_out = {"output.weight": np.zeros((300, 32), np.float32)}
    _refused_fast(_model_file(tmp_path, gpt2, extra=bad_out), "'output.weight'", "(300, 64)")
    _refused_fast(_model_file(tmp_path, gpt2, extra={"token_embd.weight": np.zeros(64, np.float32)}),
                  "'token_embd.weight'", "(vocabulary, width)")


# ---------------------------------------------------------------------- hostile tokenizers

def _sp_tokens(n=8):
    return ["<unk>", "<s>", "</s>"] + [f"p{i}" for i in range(n - 3)]


def _tokenizer_file(tmp_path, **changes) -> Path:
    """A tensor-less GGUF with a small SentencePiece vocabulary; `changes` as in _model_file
    (keys without the "tokenizer.ggml." prefix; chat_template is tokenizer.chat_template)."""
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _sp_tokens(),
            "tokenizer.ggml.scores": np.zeros(8, np.float32), "tokenizer.ggml.token_type": np.array([2, 3, 3] + [1] * 5, np.int32),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for key, v in changes.items():
        key = "tokenizer." + key if key == "chat_template" else "tokenizer.ggml." + key
        if v is None:
            meta.pop(key)
        else:
            meta[key] = v
    path = tmp_path / "tok.gguf"
    G.write_gguf(path, meta, {})
    return path


def _tokenizer_refused(path, *fragments) -> str:
    with pytest.raises(FormatError) as e:
        M.tokenizer_from_metadata(G.GGUFFile(path))
    msg = str(e.value)
    for frag in (str(path),) + fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_valid_tokenizer_baseline(tmp_path):
    tok = M.tokenizer_from_metadata(G.GGUFFile(_tokenizer_file(tmp_path)))
    assert tok.vocab_size == 8 and (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)


@pytest.mark.parametrize("changes,fragments", [
    (dict(scores=np.float32(0.5)), ["'tokenizer.ggml.scores'", "must be floats", "float32"]),
    (dict(scores=np.zeros(7, np.float32)), ["'tokenizer.ggml.scores'", "7 entries for 8 tokens"]),
    (dict(scores=np.array([0.0] * 7 + [np.nan], np.float32)), ["'tokenizer.ggml.scores'", "token 7 is NaN"]),
    (dict(scores=["a"] * 8), ["'tokenizer.ggml.scores'", "array[string]"]),
    (dict(token_type=np.array([2, 3, 3, 1, 1, 1, 1, 7], np.int32)), ["'tokenizer.ggml.token_type'", "token 7 has type 7"]),
    (dict(token_type=np.array([0] * 8, np.int32)), ["'tokenizer.ggml.token_type'", "token 0 has type 0"]),
    (dict(token_type=["x"] * 8), ["'tokenizer.ggml.token_type'", "must be ints"]),
    (dict(tokens=np.arange(8, dtype=np.int32)), ["'tokenizer.ggml.tokens'", "must be strings"]),
    (dict(tokens="<unk>"), ["'tokenizer.ggml.tokens'", "must be strings"]),
    (dict(tokens=[]), ["'tokenizer.ggml.tokens'", "empty"]),
    (dict(model=["llama"]), ["'tokenizer.ggml.model'", "must be string"]),
    (dict(model="bert"), ["'tokenizer.ggml.model'", "'bert' is not supported"]),
    (dict(bos_token_id=True), ["'tokenizer.ggml.bos_token_id'", "must be int"]),
    (dict(bos_token_id=8), ["'tokenizer.ggml.bos_token_id'", "8 is not a token id in [0, 8)"]),
    (dict(eos_token_id=np.int32(-1)), ["'tokenizer.ggml.eos_token_id'", "-1 is not a token id"]),
    (dict(unknown_token_id=99), ["'tokenizer.ggml.unknown_token_id'", "99 is not a token id"]),
    (dict(add_bos_token="yes"), ["'tokenizer.ggml.add_bos_token'", "must be bool"]),
    (dict(add_space_prefix=1), ["'tokenizer.ggml.add_space_prefix'", "must be bool"]),
    (dict(chat_template=7), ["'tokenizer.chat_template'", "must be string"]),
    (dict(chat_template=["{{ x }}"]), ["'tokenizer.chat_template'", "must be string"]),
])
def test_sentencepiece_metadata_of_the_wrong_kind_is_refused(tmp_path, changes, fragments):
    _tokenizer_refused(_tokenizer_file(tmp_path, **changes), *fragments)


def test_gpt2_vocabulary_metadata_is_checked(tmp_path):
    from nt.tokenizer import bytes_to_unicode
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["he"]
    base = dict(model="gpt2", tokens=tokens, scores=None, token_type=np.ones(257, np.int32), merges=["h e"])
    assert M.tokenizer_from_metadata(G.GGUFFile(_tokenizer_file(tmp_path, **base))).vocab_size == 257
    _tokenizer_refused(_tokenizer_file(tmp_path, **{**base, "merges": np.array([1, 2], np.int32)}),
                       "'tokenizer.ggml.merges'", "must be strings")
    _tokenizer_refused(_tokenizer_file(tmp_path, **{**base, "merges": "h e"}), "'tokenizer.ggml.merges'")
    _tokenizer_refused(_tokenizer_file(tmp_path, **{**base, "pre": 3}), "'tokenizer.ggml.pre'", "must be string")
    _tokenizer_refused(_tokenizer_file(tmp_path, **{**base, "tokens": tokens[:200] + tokens[:57]}),
                       "bad gpt2 vocabulary", "duplicate")


def test_tokenizer_larger_than_the_embedding_is_refused_before_building(tmp_path):
    meta, arrays = _llama_parts()
    tokens = _sp_tokens(301)
    changes = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.scores": np.zeros(301, np.float32)}
    path = _model_file(tmp_path, (meta, arrays), changes)
    G.write_gguf(path, {**meta, **changes}, {n: (a, "F32") for n, a in arrays.items()})  # keep the tokenizer model
    _refused_fast(path, "'tokenizer.ggml.tokens'", "301 tokens", "300 rows")


def _tiny_model_file() -> bytes:
    """A whole (tiny) Llama file with a SentencePiece vocabulary, as bytes."""
    from nt.models import Llama, LlamaConfig
    cfg = LlamaConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=8, block_size=16,
                      rope_pairing="interleaved", tie_embeddings=False)
    meta, arrays = M._llama_export(Llama(cfg, seed=2))
    meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _sp_tokens(),
                 "tokenizer.ggml.scores": np.arange(8, dtype=np.float32),
                 "tokenizer.ggml.token_type": np.array([2, 3, 3] + [1] * 5, np.int32),
                 "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})
    path = Path(_WORKDIR.name) / "tiny_model.gguf"
    G.write_gguf(path, meta, {n: (a, "F32") for n, a in arrays.items()})
    with G.GGUFFile(path) as f:
        head = f.data_offset   # mutate the metadata and directory, where the numbers are
    return path.read_bytes(), head


MODEL, MODEL_HEAD = _tiny_model_file()
_model_mutation = st.one_of(
    st.tuples(st.just("xor"), st.integers(24, MODEL_HEAD - 1), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(24, MODEL_HEAD - 8), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u32"), st.integers(24, MODEL_HEAD - 4), st.sampled_from(INTERESTING[:10])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(_model_mutation, min_size=1, max_size=2))
def test_fuzz_mutated_model_files_load_or_raise_format_error(ops):
    """Whatever a mutation does to the keys, values or directory of a model file, load
    builds a model or raises FormatError: never another exception."""
    data = bytearray(MODEL)
    for op in ops:
        data = _mutate(data, op)
    _counter[0] += 1
    path = Path(_WORKDIR.name) / f"m{_counter[0]}.gguf"
    path.write_bytes(bytes(data))
    try:
        model = M.load(path)
        assert model.tokenizer is None or model.tokenizer.vocab_size <= model.config.vocab_size
    except FormatError as e:
        assert str(path) in str(e)
    finally:
        path.unlink()
