"""Tokenizers built from GGUF tokenizer.ggml.* metadata (files written by the gguf package)."""
import gguf
import numpy as np
import pytest

from nt.io import FormatError
from nt.io.gguf import GGUFFile
from nt.models.gguf import tokenizer_from_metadata
from nt.tokenizer import BPE, SentencePieceBPE

from .tiny_vocab import ENDOFTEXT_ID, gpt2_metadata, sp_metadata


def _write(path, md):
    """A tensor-less GGUF file carrying md, written by the gguf package (the oracle)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in md:
        w.add_token_merges(md["tokenizer.ggml.merges"])
    if "tokenizer.ggml.pre" in md:
        w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    if "tokenizer.ggml.scores" in md:
        w.add_token_scores(md["tokenizer.ggml.scores"])
    w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    if "tokenizer.chat_template" in md:
        w.add_chat_template(md["tokenizer.chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokenizer_from_metadata(GGUFFile(path))


def test_gpt2_vocab_from_gguf(tmp_path):
    tok = _write(tmp_path / "g.gguf", gpt2_metadata())
    assert isinstance(tok, BPE) and tok.vocab_size == 261
    assert tok.bos_id == tok.eos_id == ENDOFTEXT_ID and tok.chat_template is None
    # by hand: hello -> he|l|l|o -> he|ll|o -> hell|o ; " world" -> Ġw|o|r|l|d
    assert tok.encode("hello world") == [258, ord("o"), 259, ord("o"), ord("r"), ord("l"), ord("d")]
    assert tok.encode("hell<|endoftext|>", allowed_special="all") == [258, ENDOFTEXT_ID]
    assert ENDOFTEXT_ID not in tok.encode("hell<|endoftext|>")   # not allowed: plain text
    for text in ["hello world", "héllo wörld ✓ 🙂", "  two  spaces\n", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_bytes(259) == b" w"


@pytest.mark.parametrize("name, pre", [("llama-bpe", "llama3"), ("qwen2", "qwen2"), ("smollm", "digits"),
                                       ("gpt-2", "gpt2")])
def test_gpt2_vocab_takes_the_files_pre_tokenizer(tmp_path, name, pre):
    md = gpt2_metadata()
    md["tokenizer.ggml.pre"] = name
    tok = _write(tmp_path / "p.gguf", md)
    assert tok.pre == pre
    assert _write(tmp_path / "d.gguf", gpt2_metadata()).pre == "gpt2"   # no key: GPT-2's


def test_unknown_pre_tokenizer_warns_and_splits_as_gpt2(tmp_path):
    md = gpt2_metadata()
    md["tokenizer.ggml.pre"] = "some-future-model"
    with pytest.warns(UserWarning, match="some-future-model"):
        tok = _write(tmp_path / "u.gguf", md)
    assert tok.pre == "gpt2"


def test_sentencepiece_vocab_from_gguf(tmp_path):
    tok = _write(tmp_path / "s.gguf", sp_metadata())
    assert isinstance(tok, SentencePieceBPE)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert tok.chat_template.startswith("{% for m in messages %}")
    # by hand (see tiny_vocab scores): ▁|h|e|l|l|o|▁|w|o|r|l|d -> ll (-1.5), he (-2.5),
    # hell (-0.5, newly possible), ▁w (-3.5), or (-4.5)
    assert tok.encode("hello world") == [259, 269, 263, 270, 271, 262, 266]
    # byte fallback: é is not a piece -> its UTF-8 bytes C3 A9 through <0xC3> <0xA9> (id 3 + byte)
    assert tok.encode("hé") == [259, 260, 3 + 0xC3, 3 + 0xA9]
    # control / user-defined tokens only when allowed; the text after one gets the space prefix again
    assert tok.encode("<|im_start|>he", allowed_special="all") == [272, 259, 268]
    assert 272 not in tok.encode("<|im_start|>he")
    assert tok.token_bytes(2) == b""   # </s> prints nothing
    for text in ["hello world", "héllo wörld ✓ 🙂", "a  b\tc\n", "x"]:
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_unknown_without_byte_tokens():
    tok = SentencePieceBPE(["<unk>", "\u2581", "a"], [0.0, -1.0, -2.0], [2, 1, 1])
    assert tok.encode("a z") == [1, 2, 1, 0]


def test_bad_tokenizer_metadata_is_refused(tmp_path):
    md = gpt2_metadata()
    md["tokenizer.ggml.merges"] = ["h q"]   # 'q' + 'h' ... 'hq' is not a token
    with pytest.raises(FormatError, match="bad gpt2 vocabulary"):
        _write(tmp_path / "b.gguf", md)
    md = sp_metadata()
    md["tokenizer.ggml.eos_token_id"] = 10_000
    with pytest.raises(FormatError, match="eos_token_id"):
        _write(tmp_path / "c.gguf", md)
