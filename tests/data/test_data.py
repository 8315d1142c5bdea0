"""Token shards (uint16 and uint32), the multi-shard DataLoader, text chunking and
`python -m nt.data prepare`."""
import json
import subprocess
import sys

import numpy as np
import pytest

from nt.data import DataLoader, encode_text, prepare
from nt.io import FormatError, read_llmc_tokens, write_llmc_tokens
from nt.tokenizer import BPE, PRE_TOKENIZERS, pretokenize, text_chunks


def windows_of(loader, batches):
    seen = []
    for _ in range(batches):
        x, y = loader.next_batch()
        assert np.array_equal(x[:, 1:], y[:, :-1])
        seen.extend((int(a), int(b)) for a, b in zip(x[:, 0], y[:, -1]))
    return seen


def test_loader_over_many_shards_never_straddles_and_ranks_partition():
    # shard k holds k*1000 + position, so a window's first and last token tell where it came from
    T, B = 8, 2
    shards = [k * 1000 + np.arange(n) for k, n in enumerate([41, 57, 33, 90])]
    all_windows = {(int(s[i * T]), int(s[i * T + T])) for s in shards for i in range((s.size - 1) // T)}
    assert len(all_windows) == 5 + 7 + 4 + 11 == 27
    for shuffle in (False, True):
        per_rank = []
        for rank in range(3):
            loader = DataLoader(shards, B, T, shuffle=shuffle, seed=4, rank=rank, world_size=3)
            assert loader.batches_per_epoch == 27 // 3 // B  # 4 batches, 24 windows of 27
            got = windows_of(loader, loader.batches_per_epoch)
            assert all(first // 1000 == last // 1000 for first, last in got)  # one shard per window
            per_rank.append(set(got))
        union = set().union(*per_rank)
        assert sum(map(len, per_rank)) == len(union) == 24 and union <= all_windows  # disjoint
    exact = [k * 1000 + np.arange(8 * n + 1) for k, n in enumerate([3, 5])]  # 8 windows: all used
    per_rank = [set(windows_of(DataLoader(exact, 2, 8, shuffle=True, rank=r, world_size=2), 2)) for r in range(2)]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {(int(s[i * 8]), int(s[i * 8 + 8])) for s in exact for i in range(s.size // 8)}


def test_loader_shuffles_per_epoch_and_resumes(tmp_path):
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"s{k}.bin")
        write_llmc_tokens(paths[-1], k * 1000 + np.arange(200))  # 19 windows each
    a = DataLoader(paths, 3, 10, shuffle=True, seed=9, vocab_size=3000)
    epoch0 = windows_of(a, a.batches_per_epoch)
    epoch1 = windows_of(a, a.batches_per_epoch)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    windows_of(a, 3)
    state = json.loads(json.dumps(a.state()))  # survives JSON, as in a checkpoint
    expected = windows_of(a, 5)
    b = DataLoader(paths, 3, 10, shuffle=True, seed=9)
    b.set_state(state)
    assert windows_of(b, 5) == expected
    with pytest.raises(ValueError, match="seed"):
        DataLoader(paths, 3, 10, shuffle=True, seed=1).set_state(state)
    with pytest.raises(ValueError, match="n_windows"):
        DataLoader(paths[:2], 3, 10, shuffle=True, seed=9).set_state(state)


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="shard 1: 5 tokens are too few for one window"):
        DataLoader([np.arange(100), np.arange(5)], 2, 8)
    with pytest.raises(ValueError, match="too few for one batch"):
        DataLoader([np.arange(20), np.arange(20)], 4, 8, world_size=2)  # 2 + 2 windows, a batch needs 4 per rank
    write_llmc_tokens(tmp_path / "big.bin", [1, 2, 3, 999] * 10)
    with pytest.raises(FormatError, match="token id 999 >= vocab size 500"):
        DataLoader([tmp_path / "big.bin"], 2, 4, vocab_size=500)
    with pytest.raises(ValueError, match=r"token id 999 at index 3 is outside \[0, 500\)"):
        DataLoader([np.array([1, 2, 3, 999] * 10)], 2, 4, vocab_size=500)
    (tmp_path / "magic.bin").write_bytes(b"\0" * 1024 + b"\0" * 80)
    with pytest.raises(FormatError, match="bad magic"):
        DataLoader([tmp_path / "magic.bin"], 2, 4)


def test_uint32_shards(tmp_path):
    tokens = np.array([0, 70000, 2 ** 32 - 1, 5], dtype=np.int64)
    write_llmc_tokens(tmp_path / "w.bin", tokens, dtype=np.uint32)
    got = read_llmc_tokens(tmp_path / "w.bin")
    assert got.dtype == np.uint32 and np.array_equal(got, tokens)
    header = np.fromfile(tmp_path / "w.bin", dtype="<i4", count=3)
    assert header.tolist() == [20240520, 2, 4]
    with pytest.raises(FormatError, match="token id 4294967295 >= vocab size 100000"):
        read_llmc_tokens(tmp_path / "w.bin", vocab_size=100000)
    raw = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "v.bin").write_bytes(raw[:4] + (7).to_bytes(4, "little") + raw[8:])
    with pytest.raises(FormatError, match="unsupported token shard version 7"):
        read_llmc_tokens(tmp_path / "v.bin")


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_text_chunks_keep_pretokens(pre):
    text = "a\n\n  b\nword \nnext\n\tx\ny z\n. \n12\n3!\n\r\nq,\n" * 50 + "end\n"
    chunks = list(text_chunks(text, 7))
    assert "".join(chunks) == text and len(chunks) > 10
    assert [t for c in chunks for t in pretokenize(c, pre)] == pretokenize(text, pre)


def test_prepare_writes_tokenizer_and_shards(tmp_path):
    from nt.data import builtin_corpus_text
    text = builtin_corpus_text()[:60_000]
    (tmp_path / "a.txt").write_text(text[:30_000])
    (tmp_path / "b.txt").write_text(text[30_000:])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nt.data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                           "--out", str(out), "--vocab-size", "400", "--shard-tokens", "5000", "--pre", "llama3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 400 and len(meta["train"]) > 1
    bpe = BPE.load(out / "tokenizer")
    assert bpe.pre == "llama3"
    train = np.concatenate([read_llmc_tokens(out / n, 400) for n in meta["train"]])
    val = np.concatenate([read_llmc_tokens(out / n, 400) for n in meta["val"]])
    assert all(read_llmc_tokens(out / n).size <= 5000 for n in meta["train"])
    tokens = np.concatenate([train, val])
    eot = bpe.special_tokens["<|endoftext|>"]
    assert bpe.decode(tokens) == "<|endoftext|>" + text[:30_000] + "<|endoftext|>" + text[30_000:]
    assert tokens[0] == eot and np.array_equal(encode_text(bpe, text[:30_000], chunk_chars=999), tokens[1:np.flatnonzero(tokens == eot)[1]])
    loader = DataLoader([out / n for n in meta["train"]], 4, 32, vocab_size=bpe.vocab_size)
    loader.next_batch()
    # a given tokenizer is reused as is
    meta2 = prepare([tmp_path / "b.txt"], tmp_path / "out2", tokenizer=out / "tokenizer", verbose=False)
    assert meta2["vocab_size"] == 400
    bad = subprocess.run([sys.executable, "-m", "nt.data", "prepare", str(tmp_path / "missing.txt"), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "missing.txt" in bad.stderr
