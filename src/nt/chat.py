"""Text in, text out: load a model with its tokenizer, format chats, stream generations.

    python -m nt chat MODEL [--system "..."] [--temperature 0.7] [--top-k 40] [--top-p 0.95]
    python -m nt complete MODEL --prompt "Once upon a time" [--max-new-tokens 64]

MODEL is a GGUF file (its tokenizer comes from the file), an nt checkpoint folder or an
llm.c .bin checkpoint (tokens are bytes unless --tokenizer names a GPT-2-format folder).
Chat prompts use a simple template chosen from the file's tokenizer.chat_template by the
markers it contains (ChatML, Llama-2 [INST], Llama-3 headers, Gemma turns; ChatML when
there is none or it is unrecognised). No Jinja is evaluated.
"""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

import numpy as np

from .tokenizer import BPE, ByteTokenizer

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


def load(path, keep_quantized: bool = False, tokenizer_dir: Optional[str] = None):
    """(model, tokenizer) from a GGUF file, an nt checkpoint folder or an llm.c .bin file."""
    from . import models
    path = Path(path)
    if path.is_dir():
        from .io.checkpoint import load_model
        model = load_model(path)
    elif path.suffix == ".gguf":
        model = models.from_gguf(path, keep_quantized=keep_quantized)
    else:
        model = models.GPT2.from_llmc(path)
    tok = model.tokenizer
    if tokenizer_dir is not None:
        tok = BPE.load(tokenizer_dir)
    if tok is None:
        if model.config.vocab_size > 512:
            raise ValueError(f"{path} carries no tokenizer and has {model.config.vocab_size} tokens: "
                             "pass --tokenizer DIR (a GPT-2 vocab.json + merges.txt folder)")
        tok = ByteTokenizer()
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
    ids = tok.encode(text, allowed_special="all")
    if tok.add_bos and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    keep = max(1, block_size - max_new_tokens)
    return np.asarray(ids[-keep:], dtype=np.int32)


def _stops(tok, extra: list[str], template: Optional[str] = None) -> tuple[set, list]:
    """Stop token ids (eos, the template's end-of-turn token) and stop strings."""
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    strings = list(extra)
    if template is not None:
        marker = end_marker(template)
        special = getattr(tok, "special_tokens", {})
        if marker in special:
            ids.add(special[marker])
        else:
            strings.append(marker)
    return ids, strings


def generate_text(model, tok, prompt_ids: np.ndarray, out: TextIO, args, stop_ids, stop_strings) -> str:
    streamer = Streamer(tok, out, stop_ids, stop_strings)
    model.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   top_p=args.top_p, seed=args.seed, on_token=streamer, stop=list(stop_ids) + stop_strings)
    return streamer.finish()


def chat(model, tok, args, inp: TextIO, out: TextIO) -> list[dict]:
    """The REPL: one user message per input line ('/reset' forgets the conversation, '/exit'
    or end of input quits). Returns the conversation."""
    template = detect_template(tok.chat_template)
    stop_ids, stop_strings = _stops(tok, args.stop or [], template)
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
        prompt = _prompt_ids(tok, format_chat(messages, template), model.config.block_size, args.max_new_tokens)
        reply = generate_text(model, tok, prompt, out, args, stop_ids, stop_strings)
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})


def complete(model, tok, args, out: TextIO) -> str:
    """One completion of --prompt, streamed; returns the generated text."""
    stop_ids, stop_strings = _stops(tok, args.stop or [])
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
        s.add_argument("model", help="a .gguf file, an nt checkpoint folder or an llm.c .bin file")
        s.add_argument("--temperature", type=float, default=0.7)
        s.add_argument("--top-k", type=int, default=40, help="0 = no top-k")
        s.add_argument("--top-p", type=float, default=0.95)
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--stop", action="append", help="a stop string (repeatable)")
        s.add_argument("--tokenizer", default=None, help="GPT-2-format tokenizer folder (vocab.json, merges.txt)")
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
    if args.command == "chat":
        chat(model, tok, args, inp, out)
    else:
        complete(model, tok, args, out)
    return 0
