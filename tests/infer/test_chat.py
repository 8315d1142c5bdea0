"""python -m nt chat / complete on a tiny GGUF Llama with a SentencePiece vocabulary."""
import io
import subprocess
import sys

import numpy as np
import pytest

import nt
from nt import chat
from nt.models import gguf
from nt.models import Llama, LlamaConfig
from nt.tokenizer import ByteTokenizer

from .tiny_vocab import sp_metadata


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=274, rope_pairing="interleaved", block_size=128)
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    gguf.write(path, Llama(cfg, seed=3), "Q8_0", metadata=sp_metadata())
    return path


def test_templates():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert chat.format_chat(msgs, "chatml") == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                                                "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    assert chat.format_chat(msgs, "llama2") == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>[INST] V [/INST]"
    assert chat.format_chat(msgs[1:2], "gemma") == "<start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\n"
    assert chat.detect_template(None) == "chatml"
    assert chat.detect_template("{{ '<|start_header_id|>' + m.role }}") == "llama3"
    assert chat.detect_template("{{ '[INST] ' + m.content }}") == "llama2"


def test_streamer_holds_back_and_cuts_stop_strings():
    out = io.StringIO()
    s = chat.Streamer(ByteTokenizer(), out, stop_ids={0}, stop_strings=["END"])
    for b in "hi thereEN".encode():
        s(b)
    assert out.getvalue() == "hi there"        # "EN" held back: it may start "END"
    s(ord("D"))
    s(ord("x"))                                # after the stop: ignored
    assert s.finish() == "hi there" and out.getvalue() == "hi there"
    out = io.StringIO()
    s = chat.Streamer(ByteTokenizer(), out)
    for b in "é✓".encode():                    # multi-byte characters appear only when complete
        s(b)
    assert s.finish() == "é✓" and out.getvalue() == "é✓"


def test_chat_repl_streams_greedy_replies(tiny_gguf):
    inp = io.StringIO("hello world\n/reset\nhello\n")
    out = io.StringIO()
    args = chat.parser().parse_args(["chat", str(tiny_gguf), "--temperature", "0", "--max-new-tokens", "6",
                                     "--system", "be brief", "--keep-quantized"])
    model, tok = chat.load(args.model, keep_quantized=True)
    assert model.quantized and tok.chat_template is not None
    messages = chat.chat(model, tok, args, inp, out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "hello"
    # the reply is the greedy continuation of the prompt the file's chat template renders, decoded
    prompt = [tok.bos_id] + tok.encode(chat.prompt_text(tok, messages[:2]), allowed_special="all")
    assert 272 in prompt  # <|im_start|> is one token
    ids = list(model.generate(np.array(prompt), 6, temperature=0)[len(prompt):])
    if 2 in ids:  # </s> ends the reply
        ids = ids[:ids.index(2)]
    assert messages[2]["content"] == tok.decode_bytes(ids).decode("utf-8", "replace")
    assert out.getvalue().count("> ") >= 3 and messages[2]["content"] in out.getvalue()


def test_complete_command_in_a_subprocess(tiny_gguf):
    r = subprocess.run([sys.executable, "-m", "nt", "complete", str(tiny_gguf), "--prompt", "hello",
                        "--temperature", "0", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model = nt.models.from_gguf(tiny_gguf)
    tok = model.tokenizer
    prompt = [1] + tok.encode("hello")
    ids = list(model.generate(np.array(prompt), 5, temperature=0)[len(prompt):])
    if 2 in ids:
        ids = ids[:ids.index(2)]
    assert r.stdout == tok.decode_bytes(ids).decode("utf-8", "replace") + "\n"


def test_load_refuses_big_vocab_without_tokenizer(tmp_path):
    model = nt.models.GPT2(nt.models.GPT2Config(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=32))
    model.save_llmc(tmp_path / "m.bin")
    with pytest.raises(ValueError, match="--tokenizer"):
        chat.load(tmp_path / "m.bin")
