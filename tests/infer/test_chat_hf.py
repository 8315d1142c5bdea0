"""Chat templates rendered as transformers renders them (fixtures: apply_chat_template's
text and ids, made by tests/fixtures/hf/make_tokenizers.py), the sandbox, and
python -m nt chat / complete on Hugging Face model folders."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nt
from nt import chat
from nt.io.common import FormatError
from nt.tokenizer import ByteTokenizer, from_pretrained

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
TOKENIZERS = HF / "tokenizers"
CHATS = sorted(p.name[:-len(".chat.json")] for p in TOKENIZERS.glob("*.chat.json"))


def folder(name: str) -> Path:
    return HF / "models" / name[len("model_"):] if name.startswith("model_") else TOKENIZERS / name


def test_every_template_kind_has_cases():
    assert len(CHATS) == 9
    errors = [c for name in CHATS for c in json.loads((TOKENIZERS / f"{name}.chat.json").read_text())
              if "error" in c]
    assert errors and all("roles must alternate" in c["error"] for c in errors)


@pytest.mark.parametrize("name", CHATS)
def test_rendered_prompt_equals_transformers(name):
    tok = from_pretrained(folder(name))
    cases = json.loads((TOKENIZERS / f"{name}.chat.json").read_text(encoding="utf-8"))
    rendered = 0
    for case in cases:
        def render():
            return chat.render_chat(tok.chat_template, case["messages"], case["add_generation_prompt"],
                                    bos_token=chat.token_text(tok, tok.bos_id),
                                    eos_token=chat.token_text(tok, tok.eos_id), tools=case["tools"])
        if "error" in case:   # the template's raise_exception
            with pytest.raises(chat.ChatTemplateError, match="roles must alternate"):
                render()
            continue
        text = render()
        assert text == case["text"]
        assert tok.encode(text, allowed_special="all") == case["ids"]
        # the chat command's prompt: no second bos where the template writes one
        assert chat._prompt_ids(tok, text, 10 ** 6, 0).tolist() == case["ids"]
        rendered += 1
    assert rendered >= 6


def test_sandbox_refuses_unsafe_templates():
    msgs = [{"role": "user", "content": "hi"}]
    for template in ("{{ ''.__class__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.__class__ }}",
                     "{{ raise_exception.__globals__ }}", "{% set _ = messages.append(1) %}",
                     "{{ messages[0].update({'role': 'x'}) }}"):
        with pytest.raises(chat.ChatTemplateError, match="sandbox refuses"):
            chat.render_chat(template, msgs)
    with pytest.raises(chat.ChatTemplateError, match="does not compile"):
        chat.render_chat("{% for m in messages %}", msgs)
    with pytest.raises(chat.ChatTemplateError, match="refused the conversation: no system role"):
        chat.render_chat("{{ raise_exception('no system role') }}", msgs)


def test_template_helpers():
    msgs = [{"role": "user", "content": "«é»"}, {"role": "assistant", "content": "b"}]
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
                "|{% generation %}{{ bos_token }}{% endgeneration %}|{{ strftime_now('%Y') | length }}"
                "|{{ tools | tojson }}")
    assert chat.render_chat(template, msgs, bos_token="<s>") == '{"role": "user", "content": "«é»"}|<s>|4|null'


# ====================================================================== the commands

def greedy(path: Path, prompt: list, n: int, end_of_turn: str = "") -> str:
    """The greedy continuation's text, cut at the first stop id (eos, generation_config's,
    the template's end-of-turn token)."""
    model = nt.models.from_pretrained(path)
    tok = from_pretrained(path)
    stops = {tok.eos_id, *chat.generation_config(path).get("eos_token_id", []), tok.special_tokens.get(end_of_turn)}
    ids = list(model.generate(np.array(prompt), n, temperature=0)[len(prompt):])
    cut = next((k for k, i in enumerate(ids) if i in stops), len(ids))
    return tok.decode_bytes(ids[:cut]).decode("utf-8", "replace")


def test_complete_command_on_a_model_folder():
    path = HF / "models" / "llama"
    r = subprocess.run([sys.executable, "-m", "nt", "complete", str(path), "--prompt", "hi", "--max-new-tokens", "3",
                        "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tok = from_pretrained(path)
    assert tok.add_bos
    assert r.stdout == greedy(path, [tok.bos_id] + tok.encode("hi"), 3) + "\n"
    assert len(r.stdout) > 1


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_chat_repl_on_a_model_folder(arch):
    path = HF / "models" / arch
    args = chat.parser().parse_args(["chat", str(path), "--temperature", "0", "--max-new-tokens", "5"])
    model, tok = chat.load(args.model)
    args.generation = chat.generation_config(path)
    out = io.StringIO()
    messages = chat.chat(model, tok, args, io.StringIO("hello there\n/exit\n"), out)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    text = chat.render_chat(tok.chat_template, messages[:1], bos_token=chat.token_text(tok, tok.bos_id),
                            eos_token=chat.token_text(tok, tok.eos_id))
    prompt = tok.encode(text, allowed_special="all")
    assert messages[1]["content"] == greedy(path, prompt, 5, chat.end_marker(chat.detect_template(tok.chat_template)))
    assert out.getvalue().startswith("> ") and messages[1]["content"] in out.getvalue()


def test_chat_repl_reports_what_the_template_refuses():
    path = HF / "models" / "mistral"   # [INST]: no system role, roles must alternate
    args = chat.parser().parse_args(["chat", str(path), "--temperature", "0", "--max-new-tokens", "2",
                                     "--system", "be brief"])
    model, tok = chat.load(args.model)
    out = io.StringIO()
    assert chat.chat(model, tok, args, io.StringIO("hi\n"), out) == [{"role": "system", "content": "be brief"}]
    assert "error: the chat template refused the conversation: Conversation roles must alternate" in out.getvalue()


def test_generation_config_seeds_defaults_and_stops():
    path = HF / "models" / "qwen2"
    args = chat.parser().parse_args(["chat", str(path)])
    args.generation = chat.generation_config(path)
    assert chat.sampling(args) == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    args = chat.parser().parse_args(["chat", str(path), "--top-k", "0", "--temperature", "0"])
    args.generation = chat.generation_config(path)
    assert chat.sampling(args) == {"temperature": 0.0, "top_k": 0, "top_p": 0.8}
    tok = from_pretrained(path)
    stop_ids, _ = chat._stops(tok, args, chat.detect_template(tok.chat_template))
    assert stop_ids == {tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"]}
    args = chat.parser().parse_args(["chat", str(HF / "models" / "gpt2")])   # no sampling fields: nt's defaults
    args.generation = chat.generation_config(HF / "models" / "gpt2")
    assert chat.sampling(args) == chat.SAMPLING_DEFAULTS


def test_no_template_falls_back_to_markers():
    tok = from_pretrained(HF / "models" / "gpt2")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.chat_template is None and chat.prompt_text(tok, msgs) == chat.format_chat(msgs, "chatml")


def test_bad_model_folders(tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(HF / "models" / "gpt2", d)
    (d / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(FormatError, match=r"generation_config\.json: eos_token_id must be int"):
        chat.generation_config(d)
    (d / "generation_config.json").write_text('{"top_p": 1.5}')
    with pytest.raises(FormatError, match=r"top_p must be in \(0, 1\]"):
        chat.generation_config(d)
    (d / "generation_config.json").write_text('{"eos_token_id": [300]}')
    with pytest.raises(FormatError, match="eos_token_id 300 is outside the model's 300 tokens"):
        chat.main(["complete", str(d), "--prompt", "x", "--max-new-tokens", "1"])
    (d / "generation_config.json").unlink()
    shutil.copy(TOKENIZERS / "gpt2" / "tokenizer.json", d / "tokenizer.json")   # 600 tokens for 300 rows
    with pytest.raises(FormatError, match="the tokenizer has 600 tokens, more than the model.s vocab_size 300"):
        chat.load(d)
    (d / "tokenizer.json").unlink()   # no tokenizer, a small vocabulary: bytes as tokens
    assert isinstance(chat.load(d)[1], ByteTokenizer)
    tok = chat.load(d, tokenizer_dir=str(HF / "models" / "gpt2"))[1]   # --tokenizer takes tokenizer.json folders
    assert tok.vocab_size == 300 and tok.eos_id == tok.special_tokens["<|endoftext|>"]
