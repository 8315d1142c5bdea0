"""Supervised fine-tuning data: chats rendered with a chat template, the loss on the
assistant's tokens only.

    chats = read_chats("chats.jsonl")               # [Chat(line, messages)], checked line by line
    rows = encode_chats(chats, tokenizer, T)        # one Row(ids, targets) per conversation
    source = ChatBatches(rows, B, T, seed=0)        # a batch source for nt.train_utils.train

    python -m nt.sft make-demo chats.jsonl          # the demo set: Python docstring questions

The JSONL holds one conversation per line: {"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]}. Anything else (invalid JSON, no `messages`, an
unknown role, non-string content, no assistant message) is a ValueError naming the line.

Template: the tokenizer's own Jinja `chat_template` when it has one (rendered by
nt.chat.render_chat as transformers renders it); otherwise ChatML, what `python -m nt chat`
uses for a tokenizer without a template:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n

`<|im_start|>` and `<|im_end|>` (nt.tokenizer.CHAT_TOKENS) are single tokens when the
tokenizer has them as special tokens (BPE.train(text, n, special_tokens=(ENDOFTEXT,
*CHAT_TOKENS))); nt's built-in BPE has only <|endoftext|>, so there they are the plain
text they spell, which a model learns just the same.

Which tokens are the assistant's: the conversation is rendered incrementally. For the
assistant message i, render(messages[:i], add_generation_prompt=True) is the prompt before
it and render(messages[:i + 1]) ends with its turn, so the text between the two (its
content and the end-of-turn marker, which teaches the model to stop) is the assistant's;
each piece is tokenized on its own, so no token straddles a prompt and an answer. A
template whose renderings are not prefixes of each other cannot be split this way and is
an error.

Batches are not packed: each conversation is one row of at most T + 1 tokens, padded to T
with target -1 (input id 0 on the padding, which the causal attention keeps from the
conversation's positions); a longer conversation is an error naming its line. Targets are
-1 on everything but the assistant's tokens, so the mean cross-entropy is over those.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .chat import TEMPLATES, render_chat, token_text
from .io.common import atomic_write_text

ROLES = ("system", "user", "assistant")
Render = Callable[[list, bool], str]    # (messages, add_generation_prompt) -> text


@dataclasses.dataclass
class Chat:
    """One conversation of a JSONL file and the line it came from (for error messages)."""
    line: int
    messages: list


@dataclasses.dataclass
class Row:
    """A tokenized conversation: inputs ids[:-1], targets (len(ids) - 1,) with -1 wherever
    the next token is not the assistant's."""
    line: int
    ids: np.ndarray
    targets: np.ndarray


# ---------------------------------------------------------------------- reading

def parse_chat(text: str, line: int, where: str = "chat") -> Chat:
    """One JSONL line -> Chat, every field checked (ValueError naming where:line)."""
    at = f"{where}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "messages" not in obj:
        raise ValueError(f"{at}: expected an object with a 'messages' list")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{at}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{at}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{at}: message {i} has unknown role {str(m['role'])[:40]!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise ValueError(f"{at}: message {i} content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{at}: no assistant message: nothing to learn from")
    return Chat(line, [{"role": m["role"], "content": m["content"]} for m in messages])


def read_chats(path) -> list[Chat]:
    """Every conversation of a JSONL file (blank lines skipped), each checked."""
    path = Path(path)
    chats = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if text.strip():
                chats.append(parse_chat(text, n, str(path)))
    if not chats:
        raise ValueError(f"{path}: no conversations")
    return chats


# ---------------------------------------------------------------------- rendering and tokenizing

def chatml(messages: list, add_generation_prompt: bool = False) -> str:
    """The default template (ChatML, as nt.chat formats prompts)."""
    fmt, opening, _ = TEMPLATES["chatml"]
    return "".join(fmt(m["role"], m["content"]) for m in messages) + (opening if add_generation_prompt else "")


def renderer_for(tokenizer) -> Render:
    """The tokenizer's Jinja chat template when it has one, else ChatML (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return chatml
    bos, eos = token_text(tokenizer, tokenizer.bos_id), token_text(tokenizer, tokenizer.eos_id)
    return lambda messages, add_generation_prompt: render_chat(template, messages, add_generation_prompt, bos, eos)


def split_turns(messages: list, render: Render) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant) pieces."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        turn = render(messages[:i + 1], False)
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation, "
                             "so the assistant's tokens cannot be found")
        pieces += [(prompt[len(done):], False), (turn[len(prompt):], True)]
        done = turn
    rest = render(messages, False)
    if not rest.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently from its turns")
    pieces.append((rest[len(done):], False))
    return [(text, mine) for text, mine in pieces if text]


def encode_chat(chat: Chat, tokenizer, T: int, render: Optional[Render] = None) -> Row:
    """One conversation -> Row; longer than T + 1 tokens is a ValueError naming its line."""
    ids, mine = [], []
    try:
        pieces = split_turns(chat.messages, render or renderer_for(tokenizer))
    except ValueError as e:   # the template refused the conversation (e.g. roles that do not alternate)
        raise ValueError(f"line {chat.line}: {e}") from None
    for text, assistant in pieces:
        piece = tokenizer.encode(text, allowed_special="all")
        ids += piece
        mine += [assistant] * len(piece)
    bos = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)   # the tokenizer starts every text with BOS; templates often write it themselves
        mine.insert(0, False)
    if len(ids) > T + 1:
        raise ValueError(f"line {chat.line}: the conversation is {len(ids)} tokens, more than T + 1 = {T + 1} "
                         "(raise -T or shorten it)")
    ids = np.asarray(ids, dtype=np.int32)
    targets = np.where(np.asarray(mine[1:], dtype=bool), ids[1:], -1).astype(np.int32)
    if not (targets >= 0).any():
        raise ValueError(f"line {chat.line}: the assistant's turns encode to no token after the first")
    return Row(chat.line, ids, targets)


def encode_chats(chats: Sequence[Chat], tokenizer, T: int) -> list[Row]:
    """encode_chat for each conversation (the template chosen once)."""
    render = renderer_for(tokenizer)
    return [encode_chat(c, tokenizer, T, render) for c in chats]


# ---------------------------------------------------------------------- batches

class ChatBatches:
    """(B, T) int32 (inputs, targets) batches of conversations, one per row padded to T,
    in a new seeded order per epoch (or in file order with shuffle=False); only whole
    batches are served. The two arrays are reused: iterating allocates nothing.
    `state()` / `set_state()` save and restore the position (nt.train_utils.train)."""

    def __init__(self, rows: Sequence[Row], B: int, T: int, shuffle: bool = True, seed: int = 0):
        if B <= 0 or T <= 0:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if len(rows) < B:
            raise ValueError(f"{len(rows)} conversations are fewer than one batch of B={B}")
        self.inputs = np.zeros((len(rows), T), dtype=np.int32)
        self.targets = np.full((len(rows), T), -1, dtype=np.int32)
        for i, row in enumerate(rows):
            n = len(row.targets)
            if n > T:
                raise ValueError(f"line {row.line}: the conversation is {n + 1} tokens, more than T + 1 = {T + 1}")
            self.inputs[i, :n] = row.ids[:-1]
            self.targets[i, :n] = row.targets
        self.B, self.T, self.shuffle, self.seed = B, T, shuffle, seed
        self.n_rows = len(rows)
        self.x = np.empty((B, T), dtype=np.int32)
        self.y = np.empty((B, T), dtype=np.int32)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        order = np.arange(self.n_rows)
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        return order

    @property
    def batches_per_epoch(self) -> int:
        return self.n_rows // self.B

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets); wraps to a new epoch when a whole batch is left no more."""
        if self.position + self.B > self.n_rows:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        rows = self._order[self.position:self.position + self.B]
        np.take(self.inputs, rows, axis=0, out=self.x)
        np.take(self.targets, rows, axis=0, out=self.y)
        self.position += self.B
        return self.x, self.y

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n_rows": self.n_rows, "seed": self.seed,
                "shuffle": self.shuffle}

    def set_state(self, state: dict) -> None:
        """Continue from a state(); the data (row count) and shuffle settings must match."""
        for key in ("n_rows", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"chat batch state is for {key}={state[key]}, these batches have {getattr(self, key)} "
                                 "(different data or settings)")
        position = int(state["position"])
        if not 0 <= position <= self.n_rows:
            raise ValueError(f"chat batch position {position} is outside the {self.n_rows} conversations")
        self.epoch, self.position = int(state["epoch"]), position
        self._order = self._epoch_order()


# ---------------------------------------------------------------------- the demo set

# Pure-Python standard-library modules whose docstrings are part of nt's built-in corpus.
DEMO_MODULES = ("argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
                "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip",
                "heapq", "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "logging", "ntpath",
                "os", "pathlib", "pickle", "platform", "posixpath", "pprint", "queue", "random", "shlex", "shutil",
                "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
                "traceback", "typing", "urllib.parse", "uuid", "warnings", "zipfile")
DEMO_SYSTEM = "You answer questions about the Python standard library in one sentence."
_SENTENCE = re.compile(r"(.+?[.!?])(\s|$)")


def first_sentence(doc: str) -> Optional[str]:
    """The first sentence of a docstring's first paragraph, when it reads like prose
    (a capitalised sentence of 4 to 24 words, no code or signature)."""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    m = _SENTENCE.match(paragraph)
    if m is None:
        return None
    sentence = m.group(1)
    words = sentence.split()
    if not (sentence[0].isupper() and 4 <= len(words) <= 24) or any(s in sentence for s in (">>>", "->", "(")):
        return None
    return sentence


def _documented(module: str) -> list[tuple[str, str, str]]:
    """(qualified name, kind, first sentence) of a module's public functions, classes and
    their methods, in source order."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    out = []

    def visit(nodes, prefix: str) -> None:
        for node in nodes:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            sentence = first_sentence(doc) if doc else None
            name = f"{prefix}.{node.name}"
            if sentence:
                out.append((name, "class" if isinstance(node, ast.ClassDef) else "function", sentence))
            if isinstance(node, ast.ClassDef):
                visit(node.body, name)

    visit(tree.body, module)
    return out


def demo_chats(modules: Sequence[str] = DEMO_MODULES, seed: int = 0) -> list[dict]:
    """The demo conversations, deterministic for a Python version: for every documented
    public function, class and method of `modules`, "What does `json.dumps` do?" (or "What
    is `json.JSONDecoder`?") answered with its docstring's first sentence; every third
    one has a system prompt. Shuffled with `seed`."""
    chats = []
    for module in modules:
        for name, kind, sentence in _documented(module):
            question = f"What is `{name}`?" if kind == "class" else f"What does `{name}` do?"
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": sentence}]
            if len(chats) % 3 == 0:
                messages.insert(0, {"role": "system", "content": DEMO_SYSTEM})
            chats.append({"messages": messages})
    order = np.random.default_rng(seed).permutation(len(chats))
    return [chats[i] for i in order]


def write_demo(path, modules: Sequence[str] = DEMO_MODULES) -> int:
    """Write the demo set as JSONL (atomically); returns the number of conversations."""
    chats = demo_chats(modules)
    atomic_write_text(path, "".join(json.dumps(c) + "\n" for c in chats))
    return len(chats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nt.sft", description="supervised fine-tuning data tools")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the demo chat set (questions on Python docstrings) as JSONL")
    demo.add_argument("out", help="output .jsonl file")
    args = p.parse_args(argv)
    try:
        n = write_demo(args.out)
    except OSError as e:
        sys.exit(f"error: cannot write {args.out}: {e.strerror}")
    print(f"wrote {n} conversations to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
