import numpy as np
import pytest

from nt.io import FormatError, read_llmc_checkpoint, read_llmc_tokens, write_llmc_checkpoint, write_llmc_tokens
from nt.io.llmc import LlmcSizes
from nt.models import GPT2, GPT2Config

CFG = GPT2Config(block_size=8, vocab_size=70, n_layer=2, n_head=2, n_embd=16)


def test_checkpoint_round_trip(tmp_path):
    model = GPT2(CFG, seed=3)
    path = tmp_path / "model.bin"
    model.save_llmc(path)
    header = np.fromfile(path, dtype="<i4", count=8)
    assert list(header) == [20240326, 3, 8, 70, 2, 2, 16, 128]
    loaded = GPT2.from_llmc(path)
    assert loaded.config == CFG
    assert np.array_equal(loaded.params.flat, model.params.flat)
    x = np.array([[1, 2, 3]], np.int32)
    assert np.array_equal(loaded(x)[0], model(x)[0])


def test_checkpoint_errors_name_file_and_problem(tmp_path):
    path = tmp_path / "model.bin"
    GPT2(CFG, seed=0).save_llmc(path)
    good = path.read_bytes()

    def broken(data, match, load=read_llmc_checkpoint):
        bad = tmp_path / "bad.bin"
        bad.write_bytes(data)
        with pytest.raises(FormatError, match=match) as info:
            load(bad)
        assert "bad.bin" in str(info.value)

    header = np.frombuffer(good[:1024], dtype="<i4").copy()
    broken(good[:100], "truncated header")
    broken(good[:-4], "truncated")
    broken(good + b"\0\0\0\0", "longer")
    for index, value, match in [(0, 1234, "bad magic"), (1, 5, "version 5"), (7, 64, "smaller than the vocab")]:
        h = header.copy()
        h[index] = value
        broken(h.tobytes() + good[1024:], match)
    # sizes the file format allows but nt's GPT-2 cannot take: refused by from_llmc
    for index, value, match in [(7, 256, "padded vocab"), (5, 3, "impossible")]:
        h = header.copy()
        h[index] = value
        if index == 7:  # a consistent file with Vp=256: 128 more wte rows
            data = h.tobytes() + good[1024:] + b"\0" * (128 * 16 * 4)
            (tmp_path / "ok.bin").write_bytes(data)
            assert read_llmc_checkpoint(tmp_path / "ok.bin")[0].padded_vocab_size == 256
        else:
            data = h.tobytes() + good[1024:]
        broken(data, match, GPT2.from_llmc)


def test_checkpoint_reader_returns_header_sizes_and_writer_takes_them(tmp_path):
    sizes = LlmcSizes(block_size=4, vocab_size=5, n_layer=1, n_head=1, n_embd=2, padded_vocab_size=7)
    flat = np.arange(sizes.param_count(), dtype=np.float32)
    write_llmc_checkpoint(tmp_path / "m.bin", sizes, flat)
    got, back = read_llmc_checkpoint(tmp_path / "m.bin")
    assert got == sizes and np.array_equal(back, flat)
    # the count is llm.c's: wte Vp*C + wpe T*C + L*(12*C*C + 13*C) + 2*C
    assert sizes.param_count() == 7 * 2 + 4 * 2 + (12 * 4 + 13 * 2) + 2 * 2


def test_checkpoint_header_sizes_checked_before_reading(tmp_path):
    """A header may claim any size: the file's real size decides before any allocation
    (n_embd=100000 once made np.fromfile ask for 447 GiB)."""
    path = tmp_path / "model.bin"
    GPT2(CFG, seed=0).save_llmc(path)
    good = path.read_bytes()
    header = np.frombuffer(good[:1024], dtype="<i4").copy()
    for index, value, match in [(6, 100000, "need .* fp32 parameters"), (4, 2 ** 31 - 1, "need"),
                                (2, 2 ** 31 - 1, "need")]:
        h = header.copy()
        h[index] = value
        path.write_bytes(h.tobytes() + good[1024:])
        with pytest.raises(FormatError, match=match):
            read_llmc_checkpoint(path)
    for index in range(2, 8):
        for value in (0, -1, -2 ** 31):
            h = header.copy()
            h[index] = value
            path.write_bytes(h.tobytes() + good[1024:])
            with pytest.raises(FormatError, match="must be positive"):
                read_llmc_checkpoint(path)


def test_token_shards_round_trip_and_errors(tmp_path):
    path = tmp_path / "tokens.bin"
    tokens = np.array([0, 5, 65535, 12], dtype=np.int64)
    write_llmc_tokens(path, tokens)
    assert np.array_equal(read_llmc_tokens(path), tokens)
    with pytest.raises(FormatError, match="token id 65535 >= vocab size 50257"):
        read_llmc_tokens(path, vocab_size=50257)
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-2])
    with pytest.raises(FormatError, match="truncated"):
        read_llmc_tokens(tmp_path / "short.bin")
    (tmp_path / "magic.bin").write_bytes(b"\1\0\0\0" + data[4:])
    with pytest.raises(FormatError, match="bad magic"):
        read_llmc_tokens(tmp_path / "magic.bin")
    with pytest.raises(ValueError, match="uint16"):
        write_llmc_tokens(path, [70000])
    with pytest.raises(ValueError, match="uint16"):
        write_llmc_tokens(path, [-1])


def test_token_shard_hostile_headers(tmp_path):
    path = tmp_path / "tokens.bin"
    write_llmc_tokens(path, np.arange(10))
    data = path.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4").copy()
    for index, value, match in [(2, -1, "negative"), (2, -2 ** 31, "negative"), (2, 2 ** 31 - 1, "truncated"),
                                (1, -5, "version -5"), (1, 0, "version 0")]:
        h = header.copy()
        h[index] = value
        (tmp_path / "bad.bin").write_bytes(h.tobytes() + data[1024:])
        with pytest.raises(FormatError, match=match):
            read_llmc_tokens(tmp_path / "bad.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="truncated header"):
        read_llmc_tokens(tmp_path / "empty.bin")
    # the path the caller names is theirs to get right: a plain FileNotFoundError
    with pytest.raises(FileNotFoundError):
        read_llmc_tokens(tmp_path / "nothing.bin")
