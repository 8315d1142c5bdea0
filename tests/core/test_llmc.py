import numpy as np
import pytest

from nt.io import FormatError, read_llmc_checkpoint, read_llmc_tokens, write_llmc_tokens
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

    def broken(data, match):
        bad = tmp_path / "bad.bin"
        bad.write_bytes(data)
        with pytest.raises(FormatError, match=match) as info:
            read_llmc_checkpoint(bad)
        assert "bad.bin" in str(info.value)

    header = np.frombuffer(good[:1024], dtype="<i4").copy()
    broken(good[:100], "truncated header")
    broken(good[:-4], "truncated")
    broken(good + b"\0\0\0\0", "longer")
    for index, value, match in [(0, 1234, "bad magic"), (1, 5, "version 5"), (7, 64, "padded vocab"),
                                (5, 3, "impossible")]:
        h = header.copy()
        h[index] = value
        broken(h.tobytes() + good[1024:], match)


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
