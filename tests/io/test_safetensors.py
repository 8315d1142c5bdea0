"""Our safetensors writer/reader against the `safetensors` library (test oracle only)."""
import json

import numpy as np
import pytest

from nt.io import FormatError, load_safetensors, save_safetensors
from nt.io.safetensors import SafetensorsFile, float_to_bf16, read_safetensors_header

st_numpy = pytest.importorskip("safetensors.numpy")


def sample():
    rng = np.random.default_rng(0)
    return {"wte": rng.standard_normal((5, 3)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
            "h": rng.standard_normal(4).astype(np.float16), "scalar": np.array(2.5),
            "empty": np.zeros((0, 3), np.float32), "mask": np.array([True, False]), "u": np.arange(3, dtype=np.uint16)}


def test_library_reads_ours(tmp_path):
    tensors = sample()
    save_safetensors(tmp_path / "a.safetensors", tensors, {"format": "nt"})
    theirs = st_numpy.load_file(str(tmp_path / "a.safetensors"))
    assert set(theirs) == set(tensors)
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and np.array_equal(theirs[k], v)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "nt"}


def test_we_read_library_files(tmp_path):
    tensors = sample()
    st_numpy.save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"k": "v"})
    ours, meta = load_safetensors(tmp_path / "b.safetensors")
    assert meta == {"k": "v"} and set(ours) == set(tensors)
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and np.array_equal(ours[k], v)


def test_roundtrip_scalar_and_big_endian(tmp_path):
    save_safetensors(tmp_path / "c.safetensors", {"s": np.array(2.5), "be": np.arange(3, dtype=">i4")})
    ours, meta = load_safetensors(tmp_path / "c.safetensors")
    assert ours["s"].shape == () and ours["s"] == 2.5 and meta == {}
    assert ours["be"].tolist() == [0, 1, 2]


def corrupt(tmp_path, header: dict, data: bytes = b"", length=None):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header,data,length,message", [
    ({}, b"", 10 ** 9, "header length"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "file holds 12"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8, None, "begin <= end"),
    ({"__metadata__": {"a": 1}}, b"", None, "metadata"),
])
def test_reader_rejects_corrupt_files(tmp_path, header, data, length, message):
    with pytest.raises(FormatError, match=message):
        load_safetensors(corrupt(tmp_path, header, data, length))


def test_reader_rejects_short_and_non_json(tmp_path):
    (tmp_path / "s").write_bytes(b"\1\2")
    with pytest.raises(FormatError, match="too short"):
        load_safetensors(tmp_path / "s")
    (tmp_path / "j").write_bytes((3).to_bytes(8, "little") + b"{{{")
    with pytest.raises(FormatError, match="JSON"):
        load_safetensors(tmp_path / "j")


def raw_file(tmp_path, header_text: str, data: bytes = b""):
    raw = header_text.encode()
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header_text,data,message", [
    # nested 100000 deep: Python's json would raise RecursionError
    ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", b"", "nested deeper"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     '"data_offsets": [0, 4]}}', b"\0" * 4, "duplicate key"),
    ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', b"\0" * 4, "NaN"),
    ('{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', b"\0" * 4, "non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', b"\0" * 4, "non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}', b"\0" * 4, "non-negative integers"),
    ('{"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}', b"\0" * 4, "shape must be list"),
    ('{"a": {"dtype": "F32", "shape": [' + ",".join(["1"] * 65) + '], "data_offsets": [0, 4]}}', b"\0" * 4,
     "65 dimensions"),
    ('{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "unsupported dtype"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [false, 4]}}', b"\0" * 4, "data_offsets"),
    # a product far past int64, with offsets that agree with it: refused on the size
    ('{"a": {"dtype": "F32", "shape": [1099511627776, 1099511627776, 1099511627776], '
     '"data_offsets": [0, 5316911983139663491615228241121378304]}}', b"\0" * 4, "absurd shape"),
    ('{"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "__metadata__"),
    ('{"__metadata__": "", "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "__metadata__"),
    ('{"__metadata__": 0, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "__metadata__"),
    ("[]", b"", "JSON object"),
])
def test_reader_rejects_hostile_headers(tmp_path, header_text, data, message):
    with pytest.raises(FormatError, match=message) as info:
        load_safetensors(raw_file(tmp_path, header_text, data))
    assert "hostile.safetensors" in str(info.value)


def test_reader_rejects_invalid_utf8_header(tmp_path):
    path = tmp_path / "u.safetensors"
    path.write_bytes((4).to_bytes(8, "little") + b'{"\xff"')
    with pytest.raises(FormatError, match="UTF-8"):
        load_safetensors(path)


def test_header_alone_is_read_without_the_data(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"x": np.zeros((2, 3), np.float32), "y": np.arange(4)})
    entries, meta, offset = read_safetensors_header(tmp_path / "a.safetensors")
    assert list(entries) == ["x", "y"] and entries["x"].shape == (2, 3) and entries["y"].dtype == "I64"
    assert offset % 8 == 0 and entries["y"].end + offset == (tmp_path / "a.safetensors").stat().st_size
    assert not list(tmp_path.glob(".*"))  # the writer's temporary file is gone


def bf16_file(path, values: np.ndarray) -> None:
    """A one-tensor BF16 file written by hand (NumPy has no bfloat16): the top 16 bits of
    each float32, which must be exactly representable."""
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"w": {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [0, bits.nbytes]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bits.tobytes())


def test_bf16_is_read_as_float32(tmp_path):
    values = np.array([[1.0, -2.5, 0.0], [3.140625, 65536.0, -1e-3]], np.float32)
    values = ((values.view(np.uint32) >> 16) << 16).view(np.float32)  # keep bf16-exact values
    bf16_file(tmp_path / "b.safetensors", values)
    ours, _ = load_safetensors(tmp_path / "b.safetensors")
    assert ours["w"].dtype == np.float32 and np.array_equal(ours["w"], values)
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert f.tensors["w"].dtype == "BF16" and f.raw("w").dtype == np.uint16
    assert np.array_equal(f.read("w", np.float64), values.astype(np.float64))
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    assert np.array_equal(load_file(str(tmp_path / "b.safetensors"))["w"].float().numpy(), values)


def test_mapped_file_reads_tensors_on_demand(tmp_path):
    tensors = sample()
    st_numpy.save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert f.metadata == {"k": "v"} and set(f.tensors) == set(tensors)
    for name, v in tensors.items():
        view = f.raw(name)
        assert view.dtype == v.dtype and np.array_equal(view, v) and not view.flags.writeable
        assert not view.flags.owndata  # a view of the map, not a copy
    assert f.read("wte", np.float64).dtype == np.float64 and np.allclose(f.read("wte"), tensors["wte"])
    assert f.read("h", np.float32).dtype == np.float32
    with pytest.raises(FormatError, match="'b' is I64, expected a float"):
        f.read("b")
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        f.raw("nope")


def test_mapped_file_validates_the_header_first(tmp_path):
    path = corrupt(tmp_path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(path)


def test_bf16_written_and_rounded_as_torch_does(tmp_path):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 100,
                             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40,
                                       1.00390625, 1.01171875], np.float32)])   # the last two: ties
    bits = float_to_bf16(values)
    save_safetensors(tmp_path / "b.safetensors", {"w": bits, "u": np.arange(3, dtype=np.uint16)}, bf16=["w"])
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert f.tensors["w"].dtype == "BF16" and f.tensors["u"].dtype == "U16"
    back = f.read("w")
    assert np.isnan(back[np.isnan(values)]).all()
    assert np.array_equal(back[-5:-3], [np.inf, -np.inf])   # past bfloat16's largest finite value
    finite = np.isfinite(back)
    assert np.all(np.abs(back[finite] - values[finite]) <= np.abs(values[finite]) * 2 ** -8 + 1e-38)  # + subnormals
    assert np.array_equal(back[-2:], [1.0, 1.015625])   # ties to even
    with pytest.raises(ValueError, match="uint16 bit patterns"):
        save_safetensors(tmp_path / "c.safetensors", {"w": values}, bf16=["w"])
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    theirs = torch.from_numpy(values).to(torch.bfloat16)
    nan = np.isnan(values)
    assert np.array_equal(theirs.view(torch.int16).numpy().view(np.uint16)[~nan], bits[~nan])
    loaded = load_file(str(tmp_path / "b.safetensors"))["w"]
    assert loaded.dtype == torch.bfloat16 and np.array_equal(loaded.float().numpy()[~nan], back[~nan])
