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
