"""Text in, text out: load a model with its tokenizer, format chats, stream generations.

    python -m nt chat MODEL [--system "..."] [--temperature 0.7] [--top-k 40] [--top-p 0.95]
    python -m nt complete MODEL --prompt "Once upon a time" [--max-new-tokens 64]

MODEL is a GGUF file (its tokenizer comes from the file), a Hugging Face model folder
(config.json + safetensors, tokenizer.json: nt.models.from_pretrained and
nt.tokenizer.from_pretrained; generation_config.json's eos ids stop generation and its
temperature / top_k / top_p are the defaults), an nt checkpoint folder or an llm.c .bin
checkpoint (tokens are bytes unless --tokenizer names a tokenizer folder: Hugging Face's
tokenizer.json or GPT-2's vocab.json + merges.txt).

Chat prompts are the tokenizer's own chat template (the Jinja source a GGUF file or
tokenizer_config.json carries) rendered as transformers renders it (render_chat: a
sandboxed jinja2 environment). Without one, a simple template is chosen by the markers
of ChatML, Llama-2 [INST], Llama-3 headers or Gemma turns (ChatML by default).
"""
from __future__ import annotations

import argparse
import codecs
import functools
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, TextIO

import numpy as np

from .io.common import FormatError, expect, read_json
from .tokenizer import BPE, ByteTokenizer, SentencePieceBPE, from_pretrained

# nt's sampling defaults, used where neither the command line nor generation_config.json sets one
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_k": 40, "top_p": 0.95}
GENERATION_CONFIG = "generation_config.json"

# template name -> (formatter of one message, text opening the assistant's turn, end-of-turn marker)
TEMPLATES: dict[str, tuple[Callable[[str, str], str], str, str]] = {
    "chatml": (lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n", "<|im_start|>assistant\n",
               "<|im_end|>"),
    "llama3": (lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "gemma": (lambda role, text: f"<start_of_turn>{'model' if role == 'assistant' else role}\n{text}<end_of_turn>\n",
              "<start_of_turn>model\n", "<end_of_turn>"),
}
# [INST] needs the pairing of user and assistant turns, so it is formatted in format_chat
LLAMA2_END = "</s>"


def detect_template(chat_template: Optional[str]) -> str:
    """The simple template a Jinja chat template looks like, by its markers (default chatml)."""
    t = chat_template or ""
    if "<|start_header_id|>" in t:
        return "llama3"
    if "<start_of_turn>" in t:
        return "gemma"
    if "[INST]" in t:
        return "llama2"
    return "chatml"


def format_chat(messages: list[dict], template: str) -> str:
    """The prompt text of messages [{"role": "system"|"user"|"assistant", "content": str}]
    ending with the opening of the assistant's turn."""
    if template == "llama2":  # <s> is the tokenizer's BOS, added by the caller
        out, system = "", ""
        for m in messages:
            if m["role"] == "system":
                system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
            elif m["role"] == "user":
                out += f"[INST] {system}{m['content']} [/INST]"
                system = ""
            else:
                out += f" {m['content']} {LLAMA2_END}"
        return out
    fmt, opening, _ = TEMPLATES[template]
    if template == "gemma":  # Gemma has no system role: it prefixes the first user turn
        merged, system = [], ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
            else:
                merged.append({"role": m["role"], "content": (system + m["content"]) if m["role"] == "user" else m["content"]})
                system = "" if m["role"] == "user" else system
        messages = merged
    return "".join(fmt(m["role"], m["content"]) for m in messages) + opening


def end_marker(template: str) -> str:
    return LLAMA2_END if template == "llama2" else TEMPLATES[template][2]


# ====================================================================== Jinja chat templates

class ChatTemplateError(ValueError):
    """A chat template that does not render: a syntax error, an unsafe attribute the sandbox
    refused, or the template's own raise_exception (e.g. roles that do not alternate)."""


def _raise_exception(message) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' filter: plain json.dumps, not jinja2's HTML-escaping tojson
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    """The sandbox transformers renders chat templates in: jinja2's ImmutableSandboxedEnvironment
    (no unsafe attributes such as __class__: an error here, no mutation of the inputs), trim_blocks and
    lstrip_blocks, loop controls, the {% generation %} tag (its body, as rendered text), and
    the globals raise_exception, strftime_now and the filter tojson."""
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        # jinja2 renders an unsafe attribute (''.__class__) as an empty Undefined; nt says so instead
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class GenerationTag(Extension):
        # transformers' AssistantTracker marks assistant text with {% generation %}; nt needs only the text
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", tools: Optional[list[dict]] = None, **extra) -> str:
    """The text a Jinja chat template makes of `messages` ([{"role": ..., "content": ...}]),
    rendered as transformers' apply_chat_template renders it (variables messages, tools,
    documents, add_generation_prompt, bos_token, eos_token, and any `extra`, e.g.
    unk_token; as transformers, message keys whose value is None are left out). A template
    that does not compile, touches an unsafe attribute or calls raise_exception is a
    ChatTemplateError."""
    import jinja2
    compiled = _compile(template)
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compiled.render(messages=plain, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                               eos_token=eos_token, **extra)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template did something the sandbox refuses: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None


def token_text(tok, i: Optional[int]) -> str:
    """The text of token i as a template writes it (bos_token, eos_token); "" for None."""
    if i is None:
        return ""
    if isinstance(tok, SentencePieceBPE):
        return tok.tokens[i]
    return tok.token_bytes(i).decode("utf-8", errors="replace")


def prompt_text(tok, messages: list[dict]) -> str:
    """The chat prompt of messages, ending with the opening of the assistant's turn: the
    tokenizer's chat template when it has one, else the simple template its markers name."""
    if tok.chat_template:
        return render_chat(tok.chat_template, messages, add_generation_prompt=True,
                           bos_token=token_text(tok, tok.bos_id), eos_token=token_text(tok, tok.eos_id))
    return format_chat(messages, detect_template(tok.chat_template))


# ====================================================================== loading

def is_hf_folder(path: Path) -> bool:
    """Whether path is a Hugging Face model folder (its config.json names a model_type;
    an nt checkpoint's names a "model")."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    return "model_type" in expect(read_json(config), dict, str(config), "the top level")


def generation_config(path) -> dict:
    """generation_config.json of a model folder, checked: {"eos_token_id": [ids], and the
    temperature, top_k, top_p it sets}; {} for anything else."""
    path = Path(path) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    where = str(path)
    config = expect(read_json(path), dict, where, "the top level")
    out = {}
    eos = config.get("eos_token_id")
    if eos is not None:
        eos = [eos] if not isinstance(eos, list) else eos
        out["eos_token_id"] = [expect(i, int, where, "eos_token_id") for i in eos]
        if any(i < 0 for i in out["eos_token_id"]):
            raise FormatError(f"{where}: eos_token_id must be non-negative, got {eos!r:.80}")
    checks = {"temperature": (lambda v: v >= 0, "a number >= 0"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
              "top_k": (lambda v: v >= 0, "an integer >= 0")}
    for key, (ok, what) in checks.items():
        value = config.get(key)
        if value is None:
            continue
        expect(value, int if key == "top_k" else (int, float), where, key)
        if not (math.isfinite(value) and ok(value)):
            raise FormatError(f"{where}: {key} must be {what}, got {value!r:.40}")
        out[key] = value
    return out


def read_tokenizer(folder):
    """The tokenizer of a folder: Hugging Face's tokenizer.json (nt.tokenizer.from_pretrained)
    when it has one, else nt's / GPT-2's vocab.json + merges.txt (BPE.load)."""
    if (Path(folder) / "tokenizer.json").exists():
        return from_pretrained(folder)
    return BPE.load(folder)


def load(path, keep_quantized: bool = False, tokenizer_dir: Optional[str] = None):
    """(model, tokenizer) from a GGUF file, a Hugging Face model folder, an nt checkpoint
    folder or an llm.c .bin file; tokenizer_dir replaces the tokenizer the model carries."""
    from . import models
    path = Path(path)
    if is_hf_folder(path):
        model = models.from_pretrained(path)
        model.tokenizer = read_tokenizer(path) if (path / "tokenizer.json").exists() else None
    elif path.is_dir():
        from .io.checkpoint import load_model
        model = load_model(path)
    elif path.suffix == ".gguf":
        model = models.from_gguf(path, keep_quantized=keep_quantized)
    else:
        model = models.GPT2.from_llmc(path)
    tok = read_tokenizer(tokenizer_dir) if tokenizer_dir is not None else getattr(model, "tokenizer", None)
    if tok is None:
        if model.config.vocab_size > 512:
            raise ValueError(f"{path} carries no tokenizer and has {model.config.vocab_size} tokens: "
                             "pass --tokenizer DIR (a tokenizer.json or GPT-2 vocab.json + merges.txt folder)")
        tok = ByteTokenizer()
    elif tok.vocab_size > model.config.vocab_size:   # its ids past the embedding would fail mid-chat
        raise FormatError(f"{tokenizer_dir or path}: the tokenizer has {tok.vocab_size} tokens, more than the "
                          f"model's vocab_size {model.config.vocab_size}")
    model.tokenizer = tok
    return model, tok


class Streamer:
    """on_token callback: writes each token's text as soon as it is complete UTF-8, holding
    back just enough characters to cut a stop string off before it is printed."""

    def __init__(self, tokenizer, out: TextIO, stop_ids=(), stop_strings=()):
        self.tok, self.out = tokenizer, out
        self.stop_ids = set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""       # everything generated (decoded)
        self.printed = 0     # characters of text written
        self.stopped = False

    def __call__(self, token: int) -> None:
        if self.stopped or token in self.stop_ids:
            self.stopped = True
            return
        self.text += self.decoder.decode(self.tok.token_bytes(token))
        for s in self.stop_strings:
            if s in self.text:
                self.text = self.text[:self.text.index(s)]
                self.stopped = True
        end = len(self.text) if self.stopped else max(self.printed, len(self.text) - self.hold)
        self._write(end)

    def _write(self, end: int) -> None:
        if end > self.printed:
            self.out.write(self.text[self.printed:end])
            self.out.flush()
            self.printed = end

    def finish(self) -> str:
        """Flush what was held back; returns the generated text (without the stop string)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        self._write(len(self.text))
        return self.text


def _prompt_ids(tok, text: str, block_size: int, max_new_tokens: int) -> np.ndarray:
    """The prompt's ids, special tokens recognised, led by bos when the tokenizer adds one
    and the text (a rendered chat template, say) does not start with it already."""
    ids = tok.encode(text, allowed_special="all")
    if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id] + ids
    keep = max(1, block_size - max_new_tokens)
    return np.asarray(ids[-keep:], dtype=np.int32)


def _stops(tok, args, template: Optional[str] = None) -> tuple[set, list]:
    """Stop token ids (eos, generation_config.json's eos ids, the template's end-of-turn
    token) and stop strings (--stop)."""
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    ids.update(args.generation.get("eos_token_id", ()))
    strings = list(args.stop or [])
    if template is not None:
        marker = end_marker(template)
        special = getattr(tok, "special_tokens", {})
        if marker in special:
            ids.add(special[marker])
        else:
            strings.append(marker)
    return ids, strings


def sampling(args) -> dict:
    """temperature, top_k, top_p: the command line's, else generation_config.json's
    (args.generation), else SAMPLING_DEFAULTS."""
    return {key: next(v for v in (getattr(args, key), args.generation.get(key), default) if v is not None)
            for key, default in SAMPLING_DEFAULTS.items()}


def generate_text(model, tok, prompt_ids: np.ndarray, out: TextIO, args, stop_ids, stop_strings) -> str:
    streamer = Streamer(tok, out, stop_ids, stop_strings)
    s = sampling(args)
    model.generate(prompt_ids, args.max_new_tokens, temperature=s["temperature"], top_k=s["top_k"] or None,
                   top_p=s["top_p"], seed=args.seed, on_token=streamer, stop=list(stop_ids) + stop_strings)
    return streamer.finish()


def chat(model, tok, args, inp: TextIO, out: TextIO) -> list[dict]:
    """The REPL: one user message per input line ('/reset' forgets the conversation, '/exit'
    or end of input quits). The prompt is the tokenizer's chat template (see prompt_text);
    a message the template refuses is reported and dropped. Returns the conversation."""
    stop_ids, stop_strings = _stops(tok, args, detect_template(tok.chat_template))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/exit":
            out.write("\n")
            return messages
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            text = prompt_text(tok, messages)
        except ChatTemplateError as e:
            out.write(f"error: {e}\n")
            messages.pop()
            continue
        prompt = _prompt_ids(tok, text, model.config.block_size, args.max_new_tokens)
        reply = generate_text(model, tok, prompt, out, args, stop_ids, stop_strings)
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})


def complete(model, tok, args, out: TextIO) -> str:
    """One completion of --prompt, streamed; returns the generated text."""
    stop_ids, stop_strings = _stops(tok, args)
    prompt = _prompt_ids(tok, args.prompt, model.config.block_size, args.max_new_tokens)
    text = generate_text(model, tok, prompt, out, args, stop_ids, stop_strings)
    out.write("\n")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nt", description="Run nt language models.",
                                epilog="python -m nt export RUN_OR_CHECKPOINT OUT [--to gguf|hf] [--type Q8_0]: "
                                       "a trained model to GGUF or a Hugging Face folder (python -m nt export -h)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("chat", "interactive chat (one message per line)"), ("complete", "one-shot completion")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("model", help="a .gguf file, a Hugging Face model folder, an nt checkpoint folder or an "
                                     "llm.c .bin file")
        # sampling: the model folder's generation_config.json, else SAMPLING_DEFAULTS, when not given
        s.add_argument("--temperature", type=float, default=None, help="default 0.7")
        s.add_argument("--top-k", type=int, default=None, help="0 = no top-k; default 40")
        s.add_argument("--top-p", type=float, default=None, help="default 0.95")
        s.set_defaults(generation={})   # generation_config.json's fields (main reads them)
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--stop", action="append", help="a stop string (repeatable)")
        s.add_argument("--tokenizer", default=None,
                       help="tokenizer folder: Hugging Face's tokenizer.json, or GPT-2's vocab.json + merges.txt")
        s.add_argument("--keep-quantized", action="store_true", help="GGUF Q8_0/Q4_0 matrices stay quantised")
        if name == "chat":
            s.add_argument("--system", default=None, help="a system message")
        else:
            s.add_argument("--prompt", required=True)
    return p


def main(argv: Optional[list[str]] = None, inp: TextIO = None, out: TextIO = None) -> int:
    args = parser().parse_args(argv)
    inp, out = inp or sys.stdin, out or sys.stdout
    model, tok = load(args.model, args.keep_quantized, args.tokenizer)
    args.generation = generation_config(args.model) if Path(args.model).is_dir() else {}
    for i in args.generation.get("eos_token_id", ()):
        if i >= model.config.vocab_size:
            raise FormatError(f"{Path(args.model) / GENERATION_CONFIG}: eos_token_id {i} is outside the model's "
                              f"{model.config.vocab_size} tokens")
    if args.command == "chat":
        chat(model, tok, args, inp, out)
    else:
        complete(model, tok, args, out)
    return 0
