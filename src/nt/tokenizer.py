"""Byte-level BPE tokenizer (GPT-2's algorithm): train merges, encode, decode, read/write
GPT-2's vocab.json + merges.txt.

    bpe = BPE.train(text, vocab_size=4096)          # learns 4096 - 256 - specials merges
    ids = bpe.encode("Hello world")                 # list[int]
    assert bpe.decode(ids) == "Hello world"
    bpe.save("tok/"); bpe = BPE.load("tok/")
    gpt2 = BPE.from_gpt2_files("vocab.json", "merges.txt")
    tok = from_pretrained("hf_model/")              # Hugging Face tokenizer.json (nt.hf_tokenizer)

Text is first split into pre-tokens by GPT-2's regex (contractions, letters, numbers,
other symbols, each optionally led by one space; whitespace runs that leave their last
space to the next word), or by one of the later models' variants (Llama 3's, Qwen2's,
digits one by one: PRE_TOKENIZERS, chosen with `pre=`). Each pre-token's UTF-8 bytes are then merged pair by pair in the
order the merges were learned. Python's `re` has no \\p{L}, so the pattern is built here
from explicit character classes derived from `unicodedata`; `\\s` is Unicode White_Space
(Python's str.isspace() minus U+001C..U+001F, as the `regex` package defines it).
"""
from __future__ import annotations

import functools
import heapq
import itertools
import json
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .io.common import MAX_JSON_BYTES, FormatError, expect, parse_json, read_json
from .kernels.cpu.bpe import PAIR_BASE, bpe_encode, bpe_train

ENDOFTEXT = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_FILE = "special_tokens.json"
PRE_FILE = "pre_tokenizer.json"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters:
    printable Latin-1 bytes map to themselves, the rest to U+0100 onwards in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _char_class(mask: np.ndarray, lo: int, hi: int) -> str:
    """A regex character-class body (no brackets) of the code points in [lo, hi) where mask holds."""
    m = np.zeros(hi - lo + 2, dtype=np.int8)
    m[1:-1] = mask[lo:hi]
    edges = np.diff(m)
    starts = np.flatnonzero(edges == 1) + lo
    ends = np.flatnonzero(edges == -1) + lo - 1
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in zip(starts, ends))


PRE_TOKENIZERS = ("gpt2", "llama3", "qwen2", "digits")


@functools.lru_cache(maxsize=1)
def _classes(astral: bool) -> tuple[str, str, str]:
    """Character-class bodies of \\p{L}, \\p{N} and \\s (Unicode White_Space: what the
    `regex` package matches; str.isspace() also accepts U+001C..U+001F)."""
    # one code point at a time: a list of all 1.1M characters held 65 MB at once
    major = np.fromiter((unicodedata.category(chr(c))[0] for c in range(0x110000)), dtype="U1", count=0x110000)
    space = np.zeros(0x110000, dtype=bool)
    space[:0x10000] = np.fromiter((chr(c).isspace() for c in range(0x10000)), dtype=bool, count=0x10000)
    space[0x1C:0x20] = False
    hi = 0x110000 if astral else 0x10000
    return _char_class(major == "L", 0, hi), _char_class(major == "N", 0, hi), _char_class(space, 0, hi)


@functools.lru_cache(maxsize=8)
def pre_pattern(pre: str = "gpt2", astral: bool = True) -> re.Pattern:
    """The pre-tokenizer regex `pre` names, compiled for Python's `re` with \\p{L}, \\p{N}
    and \\s spelled out as character classes:

    gpt2    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    llama3  contractions in either case, a letter run led by one non-letter, non-digit,
            non-newline character, digits in threes, punctuation runs that keep their
            newlines, newline runs, then whitespace as GPT-2 (Llama 3, SmolLM3)
    qwen2   llama3 with one digit per pre-token (Qwen2/2.5)
    digits  every digit alone, then gpt2 on the text between (SmolLM/SmolLM2, StarCoder):
            a two-stage split, see `pretokenize`; this is its second stage

    With astral=False the classes stop at U+FFFF: `re` matches those 4x faster, and they
    are exact for text without characters beyond the BMP.
    """
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unknown pre-tokenizer {pre!r}; known: {', '.join(PRE_TOKENIZERS)}")
    L, N, S = _classes(astral)
    space_runs = rf"[{S}]+(?![^{S}])|[{S}]+"
    if pre in ("gpt2", "digits"):
        return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|{space_runs}")
    digits = "{1,3}" if pre == "llama3" else ""
    return re.compile(rf"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\r\n{L}{N}]?[{L}]+|[{N}]{digits}"
                      rf"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|{space_runs}")


def gpt2_pattern(astral: bool = True) -> re.Pattern:
    """GPT-2's pre-tokenizer regex (pre_pattern("gpt2"))."""
    return pre_pattern("gpt2", astral)


@functools.lru_cache(maxsize=2)
def _digit_split(astral: bool) -> re.Pattern:
    return re.compile(f"([{_classes(astral)[1]}])")


def pretokenize(text: str, pre: str = "gpt2") -> list[str]:
    """Split text into pre-tokens (their concatenation is the text) by the pre-tokenizer
    `pre` (see pre_pattern)."""
    astral = bool(text) and max(text) > "\uffff"
    pattern = pre_pattern(pre, astral)
    if pre != "digits":
        return pattern.findall(text)
    out: list[str] = []
    for i, piece in enumerate(_digit_split(astral).split(text)):
        if i % 2:
            out.append(piece)  # a digit
        elif piece:
            out.extend(pattern.findall(piece))
    return out


def text_chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters whose pre-tokens are exactly the text's: each cut
    falls right after a newline that has a non-space on both sides, where every one of
    PRE_TOKENIZERS ends a token whether or not the text continues."""
    start = 0
    while start < len(text):
        cut = len(text)
        if start + size < len(text):
            pos = start + size
            while True:
                pos = text.find("\n", pos)
                if pos < 0 or pos + 1 >= len(text):
                    break
                if not text[pos - 1].isspace() and not text[pos + 1].isspace():
                    cut = pos + 1
                    break
                pos += 1
        yield text[start:cut]
        start = cut


NORMALIZERS = (None, "NFC")   # what encode may apply to text before splitting it


def _is_white_space(ch: str) -> bool:
    """Unicode White_Space (what tokenizers strips for lstrip / rstrip): str.isspace()
    without U+001C..U+001F."""
    return ch.isspace() and not "\x1c" <= ch <= "\x1f"


class TokenMatcher:
    """Finds a tokenizer's special tokens in text as tokenizers finds added tokens: the
    longest token at the leftmost place. `always` are found even where encode was not told
    to allow them (tokenizers' non-special added tokens); `lstrip` / `rstrip` tokens take
    the white space before / after them with them (AddedToken's lstrip / rstrip)."""

    def __init__(self, tokens: dict[str, int], always: Iterable[str] = (), lstrip: Iterable[str] = (),
                 rstrip: Iterable[str] = ()):
        self.tokens = tokens
        self.always, self.lstrip, self.rstrip = frozenset(always), frozenset(lstrip), frozenset(rstrip)
        unknown = (self.always | self.lstrip | self.rstrip) - set(tokens)
        if unknown:
            raise ValueError(f"token options name tokens that are not special tokens: {sorted(unknown)[:8]}")
        # one group around the whole alternation: re scans that fast (a group per token was 5000x slower)
        alts = sorted(tokens, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(re.escape(t) for t in alts) + ")") if alts else None

    def allowed(self, allowed_special: Union[str, Iterable[str]]) -> set:
        """The tokens encode finds: `allowed_special` ("all" or some of the special tokens;
        others are a ValueError) and the tokens always found."""
        if allowed_special == "all":
            return set(self.tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        return allowed | self.always

    def split(self, text: str, allowed: set) -> list[tuple[str, bool, int]]:
        """`text` cut at the tokens of `allowed`: (token, True, offset) for each token and
        (plain text, False, offset) between them; empty text is left out, and so is the
        white space an lstrip / rstrip token takes."""
        out, start = [], 0
        if allowed and self.pattern is not None:
            for m in self.pattern.finditer(text):
                token, a, b = m.group(0), m.start(), m.end()
                if token not in allowed or a < start:   # a < start: inside white space an rstrip took
                    continue
                if token in self.lstrip:
                    while a > start and _is_white_space(text[a - 1]):
                        a -= 1
                if token in self.rstrip:
                    while b < len(text) and _is_white_space(text[b]):
                        b += 1
                if a > start:
                    out.append((text[start:a], False, start))
                out.append((token, True, a))
                start = b
        if start < len(text):
            out.append((text[start:], False, start))
        return out


def _check_normalizer(normalizer: Optional[str]) -> Optional[str]:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; known: None, NFC")
    return normalizer


class BPE:
    """A byte-level BPE tokenizer: 256 byte tokens, merges, then special tokens.

    `vocab[i]` is the byte string of token i (special tokens: their UTF-8 text);
    `merges[r]` = (a, b) is the merge of rank r, making token `merge_ids[r]`;
    `pre` names the pre-tokenizer that splits text before merging (PRE_TOKENIZERS).

    Options that Hugging Face tokenizer.json files use (nt.hf_tokenizer sets them; the
    defaults are GPT-2's): `always_split` are special tokens recognised in text even when
    encode is not told to allow them (tokenizers' non-special added tokens), `lstrip` /
    `rstrip` special tokens take the white space before / after them (see TokenMatcher);
    `add_prefix_space` puts a space before text that does not start with one (ByteLevel's
    option; applied to each stretch of text between recognised tokens, as tokenizers does);
    `normalizer` "NFC" normalises each such stretch first; `ignore_merges` emits a
    pre-token that is itself a vocabulary entry as that token without merging (Llama 3).
    """

    def __init__(self, vocab: list[bytes], merges: list[tuple[int, int]], merge_ids: list[int],
                 special_tokens: Optional[dict[str, int]] = None, pre: str = "gpt2", *,
                 always_split: Iterable[str] = (), lstrip: Iterable[str] = (), rstrip: Iterable[str] = (),
                 add_prefix_space: bool = False, normalizer: Optional[str] = None, ignore_merges: bool = False):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unknown pre-tokenizer {pre!r}; known: {', '.join(PRE_TOKENIZERS)}")
        self.pre = pre
        self.vocab = list(vocab)
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.merge_ids = [int(i) for i in merge_ids]
        self.special_tokens = dict(special_tokens or {})
        self.special_ids = {i: s for s, i in self.special_tokens.items()}
        n = len(self.vocab)
        ids = {v: i for i, v in enumerate(self.vocab) if i not in self.special_ids}
        if len(ids) + len(self.special_ids) != n:
            raise ValueError("BPE vocabulary has duplicate byte strings")
        missing = [b for b in range(256) if bytes([b]) not in ids]
        if missing:
            raise ValueError(f"BPE vocabulary lacks the single-byte tokens {missing[:8]}...")
        self.byte_ids = np.array([ids[bytes([b])] for b in range(256)], dtype=np.int32)
        for r, ((a, b), m) in enumerate(zip(self.merges, self.merge_ids)):
            if not (0 <= a < n and 0 <= b < n and 0 <= m < n) or self.vocab[a] + self.vocab[b] != self.vocab[m]:
                raise ValueError(f"merge {r} ({a}, {b}) -> {m} is inconsistent with the vocabulary")
        keys = np.array([a * int(PAIR_BASE) + b for a, b in self.merges], dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        self._pair_keys = keys[order]
        if np.any(self._pair_keys[1:] == self._pair_keys[:-1]):
            raise ValueError("BPE merges list the same pair twice")
        self._pair_rank = order.astype(np.int64)
        self._pair_new = np.array(self.merge_ids, dtype=np.int32)[order] if self.merges else np.zeros(0, np.int32)
        self._cache: dict[str, list[int]] = {}
        self._matcher = TokenMatcher(self.special_tokens, always_split, lstrip, rstrip)
        self.always_split = self._matcher.always
        self.add_prefix_space = bool(add_prefix_space)
        self.normalizer = _check_normalizer(normalizer)
        self.ignore_merges = bool(ignore_merges)
        self._ids = ids if ignore_merges else {}   # bytes -> id of the ordinary tokens

    # set by nt.models.gguf.tokenizer_from_metadata / nt.hf_tokenizer when the tokenizer comes from a model
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    add_bos: bool = False
    chat_template: Optional[str] = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a special token: its text), for streaming decode.
        i must be an int or NumPy integer in [0, vocab_size)."""
        return self.vocab[_token_id(i, len(self.vocab))]

    def __repr__(self) -> str:
        return (f"BPE(vocab_size={self.vocab_size}, merges={len(self.merges)}, pre={self.pre!r}, "
                f"special={list(self.special_tokens)})")

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (ENDOFTEXT,),
              min_frequency: int = 2, pre: str = "gpt2") -> "BPE":
        """Learn merges on `text` until the vocabulary (256 bytes + merges + special tokens)
        has `vocab_size` entries, or no pair occurs `min_frequency` times any more; `pre`
        is the pre-tokenizer (PRE_TOKENIZERS).

        Special tokens take the last ids, e.g. special_tokens=(ENDOFTEXT, *CHAT_TOKENS)
        for <|endoftext|>, <|im_start|>, <|im_end|>.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        pre_pattern(pre)  # an unknown name fails here, before any work
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
        words: Counter = Counter()
        for chunk in text_chunks(text, 1 << 20):  # bounded memory for the pre-token lists
            words.update(pretokenize(chunk, pre))
        encoded = [w.encode("utf-8") for w in words]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        syms = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        counts = np.fromiter(words.values(), dtype=np.int64, count=len(words))
        merges, done = bpe_train(syms, offsets, counts, n_merges, 256, max(1, min_frequency))
        vocab = [bytes([b]) for b in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
        specials = {}
        for s in special_tokens:
            specials[s] = len(vocab)
            vocab.append(s.encode("utf-8"))
        return cls(vocab, merges.tolist(), list(range(256, 256 + done)), specials, pre)

    # ------------------------------------------------------------------ encoding

    def _encode_words(self, words: list[str]) -> list[list[int]]:
        """BPE ids of each pre-token (no cache)."""
        encoded = [w.encode("utf-8") for w in words]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        ids = self.byte_ids[np.frombuffer(b"".join(encoded), dtype=np.uint8)]
        out = np.empty(ids.shape[0], dtype=np.int32)
        out_offsets = np.empty(len(words) + 1, dtype=np.int64)
        bpe_encode(ids, offsets, self._pair_keys, self._pair_rank, self._pair_new, out, out_offsets)
        out_list = out.tolist()
        return [out_list[out_offsets[i]:out_offsets[i + 1]] for i in range(len(words))]

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of text, special-token strings treated as plain text."""
        if self.normalizer and text:
            text = unicodedata.normalize(self.normalizer, text)
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        words = pretokenize(text, self.pre)
        cache = self._cache
        new = [w for w in dict.fromkeys(words) if w not in cache]
        if new:
            if len(cache) > 500_000:
                cache.clear()
            whole = [self._ids.get(w.encode("utf-8")) for w in new]  # all None unless ignore_merges
            merged = iter(self._encode_words([w for w, i in zip(new, whole) if i is None]))
            cache.update(zip(new, [[i] if i is not None else next(merged) for i in whole]))
        return list(itertools.chain.from_iterable(map(cache.__getitem__, words)))

    def encode(self, text: str, allowed_special: Union[str, Iterable[str]] = ()) -> list[int]:
        """Token ids of `text`.

        allowed_special: the special tokens recognised in the text ("all", or a set such
        as {"<|endoftext|>"}); others are encoded as the plain text they are (default),
        except `always_split` tokens, which are always recognised.
        """
        out: list[int] = []
        for piece, is_token, _ in self._matcher.split(text, self._matcher.allowed(allowed_special)):
            if is_token:
                out.append(self.special_tokens[piece])
            else:
                out.extend(self.encode_ordinary(piece))
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of token ids (ints or NumPy integers in [0, vocab_size))."""
        vocab, n = self.vocab, len(self.vocab)
        return b"".join([vocab[_token_id(i, n)] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (special tokens as their text; bytes that are not valid
        UTF-8, e.g. a multi-byte character cut in half, become U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files

    @classmethod
    def from_gpt2_files(cls, vocab_json, merges_txt, special_tokens: Optional[Iterable[str]] = None,
                        pre: str = "gpt2") -> "BPE":
        """Read GPT-2's vocab.json (token string -> id, bytes spelled through
        bytes_to_unicode) and merges.txt (one "a b" pair per line, in rank order).

        Vocabulary entries that are not byte strings reachable by merges (like
        <|endoftext|>) become special tokens; `special_tokens` may name them explicitly
        (a mapping name -> id, as special_tokens.json holds, must agree with vocab.json).
        Anything malformed in the files is a FormatError naming the file (and line); a
        path that does not exist is a FileNotFoundError.
        """
        vocab_map = _read_vocab(Path(vocab_json))
        lines = _read_text(Path(merges_txt)).split("\n")
        first_line = 1
        if lines and lines[0].startswith("#version"):
            lines, first_line = lines[1:], 2
        return cls._from_spelled(vocab_map, lines, special_tokens, str(merges_txt), first_line, pre, str(vocab_json))

    @classmethod
    def from_tokens(cls, tokens: list[str], merges: list[str], special_tokens: Optional[Iterable[str]] = None,
                    pre: str = "gpt2") -> "BPE":
        """Build from GPT-2-spelled token strings (id = index, as GGUF's tokenizer.ggml.tokens
        lists them) and "a b" merge strings in rank order (tokenizer.ggml.merges)."""
        for what, items in (("token", tokens), ("merge", merges)):
            for i, item in enumerate(items):
                expect(item, str, "BPE token list", f"{what} {i}")
        vocab_map = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab_map) != len(tokens):
            raise FormatError("BPE token list has duplicate strings")
        return cls._from_spelled(vocab_map, merges, special_tokens, "merges", 0, pre, "BPE token list")

    @classmethod
    def _from_spelled(cls, vocab_map: dict, lines: list[str], special_tokens, where: str, first_line: int,
                      pre: str, vocab_where: str) -> "BPE":
        """The BPE of spelled tokens (vocab_map: token string -> id, ids 0..n-1) and merge
        lines; anything inconsistent is a FormatError naming `where` / `vocab_where`."""
        decoder = {u: b for b, u in bytes_to_unicode().items()}
        n = len(vocab_map)
        merges, merge_ids = [], []
        for lineno, line in enumerate(lines, first_line):
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] not in vocab_map or parts[1] not in vocab_map or \
                    parts[0] + parts[1] not in vocab_map:
                raise FormatError(f"{where}:{lineno}: bad merge line {line!r:.80}")
            merges.append((vocab_map[parts[0]], vocab_map[parts[1]]))
            merge_ids.append(vocab_map[parts[0] + parts[1]])
        if isinstance(special_tokens, dict):
            for token, i in special_tokens.items():
                if vocab_map.get(token) != i:
                    raise FormatError(f"{vocab_where}: special token {token!r:.80} has id {vocab_map.get(token)}, "
                                      f"not the {i!r:.40} the special tokens give")
        made = {m for m in merge_ids}
        vocab: list[bytes] = [b""] * n
        specials = {}
        explicit = set(special_tokens or ())
        for token, i in vocab_map.items():
            is_bytes = all(ch in decoder for ch in token)
            if token in explicit or not is_bytes or (len(token) > 1 and i not in made):
                specials[token] = i
                try:
                    vocab[i] = token.encode("utf-8")
                except UnicodeEncodeError:   # a lone surrogate, e.g. "\ud800" escaped in the JSON
                    raise FormatError(f"{vocab_where}: token {i} ({token!r:.40}) is not valid Unicode text") from None
            else:
                vocab[i] = bytes(decoder[ch] for ch in token)
        try:
            return cls(vocab, merges, merge_ids, specials, pre)
        except ValueError as e:
            raise FormatError(f"{vocab_where} / {where}: not a usable BPE vocabulary: {e}") from None

    def save(self, directory) -> None:
        """Write vocab.json + merges.txt (GPT-2's format), special_tokens.json and
        pre_tokenizer.json (which pre-tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        enc = bytes_to_unicode()
        spell = lambda i: self.vocab[i].decode("utf-8") if i in self.special_ids else \
            "".join(enc[b] for b in self.vocab[i])  # noqa: E731
        vocab_map = {spell(i): i for i in range(len(self.vocab))}
        _write_text(directory / "vocab.json", json.dumps(vocab_map, ensure_ascii=False))
        _write_text(directory / "merges.txt", "#version: 0.2\n" +
                    "".join(f"{spell(a)} {spell(b)}\n" for a, b in self.merges))
        _write_text(directory / SPECIAL_FILE, json.dumps(self.special_tokens, indent=1))
        _write_text(directory / PRE_FILE, json.dumps({"pre": self.pre}))

    @classmethod
    def load(cls, directory) -> "BPE":
        """Read a tokenizer written by `save` (or any GPT-2-format folder: then the
        pre-tokenizer is GPT-2's). A missing folder is a FileNotFoundError; a file missing
        or malformed inside it is a FormatError naming the file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {directory}")
        for name in ("vocab.json", "merges.txt"):
            if not (directory / name).is_file():
                raise FormatError(f"{directory / name}: missing (a tokenizer folder holds vocab.json and merges.txt)")
        special, pre = None, "gpt2"
        if (directory / SPECIAL_FILE).exists():
            where = str(directory / SPECIAL_FILE)
            special = expect(read_json(directory / SPECIAL_FILE), dict, where, "the top level")
            for token, i in special.items():
                expect(i, int, where, f"id of {token!r:.80}")
        if (directory / PRE_FILE).exists():
            where = str(directory / PRE_FILE)
            info = expect(read_json(directory / PRE_FILE), dict, where, "the top level")
            pre = info.get("pre")
            if pre not in PRE_TOKENIZERS:
                raise FormatError(f"{where}: \"pre\" must be one of {', '.join(PRE_TOKENIZERS)}, got {pre!r:.80}")
        return cls.from_gpt2_files(directory / "vocab.json", directory / "merges.txt", special, pre)


def _token_id(i, n: int) -> int:
    """Token id i as an int: a Python or NumPy integer (not a bool, not a float, which
    int() would truncate to some other token) in [0, n)."""
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"token ids must be integers, got {type(i).__name__} {i!r:.40}")
    if not 0 <= i < n:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
    return int(i)


def _read_bounded(path: Path) -> bytes:
    """A tokenizer file's bytes, refused past MAX_JSON_BYTES before it is read."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise FormatError(f"{path}: {size} bytes is more than the {MAX_JSON_BYTES} allowed for a tokenizer file")
    return path.read_bytes()


def _read_text(path: Path) -> str:
    """A tokenizer file's UTF-8 text; invalid UTF-8 is a FormatError naming the line."""
    raw = _read_bounded(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise FormatError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.json: an object of token string -> id, the ids exactly 0..n-1 for n entries
    (so nothing sized by an id can outgrow the file)."""
    where = str(path)
    vocab = expect(parse_json(_read_bounded(path), where), dict, where, "the top level")
    n = len(vocab)
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise FormatError(f"{path}: id of {token!r:.80} must be an integer in [0, {n}) for {n} entries, "
                              f"got {i!r:.40}")
    if len(set(vocab.values())) != n:
        raise FormatError(f"{path}: ids are not 0..{n - 1} without gaps (an id repeats)")
    return vocab


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# SentencePiece token types, as GGUF's tokenizer.ggml.token_type stores them
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # '▁', SentencePiece's visible space
# where SentencePieceBPE puts a '▁' before a stretch of text between recognised tokens:
#   piece   always (SentencePiece's add_dummy_prefix, llama.cpp, tokenizers' Prepend normalizer)
#   always  unless it starts with '▁' already (tokenizers' Metaspace, prepend_scheme "always")
#   first   only at the start of the text, unless it starts with '▁' (Metaspace "first")
#   never
PREFIX_SCHEMES = ("piece", "always", "first", "never")


class SentencePieceBPE:
    """SentencePiece's BPE model (LLaMA-1/2, Mistral, Gemma vocabularies; GGUF model "llama").

    Encoding: spaces become '▁' (and one '▁' is prepended at the start and after each
    special token: add_space_prefix, as llama.cpp does), the text is
    split into characters, then the adjacent pair whose concatenation is a vocabulary piece
    with the highest score is merged (leftmost on ties) until no pair is a piece. Characters
    left that are not pieces are spelled as their UTF-8 bytes through the <0xXX> byte
    tokens (or the unknown token when the vocabulary has none). Control tokens (<s>, </s>)
    never come out of plain text; with allowed_special they are recognised as written.

    Options for Hugging Face tokenizer.json files (nt.hf_tokenizer sets them): `merges`, the
    (left, right) piece pairs in rank order, makes pairs merge by rank as tokenizers' BPE
    model does (only listed pairs, the lowest rank first) instead of by score;
    `prefix_scheme` (PREFIX_SCHEMES; default from add_space_prefix: "piece" or "never");
    `split_words` cuts the text before every '▁' and merges within the words (Metaspace's
    split); `strip_space` removes one leading space when decoding (default: add_space_prefix);
    `always_split` are special tokens recognised even when not allowed (non-special added
    tokens), `lstrip` / `rstrip` take white space with them (TokenMatcher); `normalizer`
    "NFC"; `fuse_unk` emits one unknown token for a run of unknown characters;
    `ignore_merges` emits a word that is itself a piece as that piece.
    """

    def __init__(self, tokens: Sequence[str], scores: Optional[Sequence[float]] = None,
                 token_types: Optional[Sequence[int]] = None, add_space_prefix: bool = True,
                 unk_id: Optional[int] = None, *, merges: Optional[Sequence[tuple[str, str]]] = None,
                 prefix_scheme: Optional[str] = None, split_words: bool = False,
                 strip_space: Optional[bool] = None, always_split: Iterable[str] = (),
                 lstrip: Iterable[str] = (), rstrip: Iterable[str] = (), normalizer: Optional[str] = None,
                 fuse_unk: bool = False, ignore_merges: bool = False):
        n = len(tokens)
        self.tokens = list(tokens)
        self.scores = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
        self.types = np.full(n, SP_NORMAL, np.int32) if token_types is None else np.asarray(token_types, np.int32)
        if self.scores.shape != (n,) or self.types.shape != (n,):
            raise ValueError(f"SentencePiece vocabulary: {n} tokens but {self.scores.shape[0]} scores "
                             f"and {self.types.shape[0]} token types")
        if prefix_scheme is None:
            prefix_scheme = "piece" if add_space_prefix else "never"
        if prefix_scheme not in PREFIX_SCHEMES:
            raise ValueError(f"unknown prefix scheme {prefix_scheme!r}; known: {', '.join(PREFIX_SCHEMES)}")
        self.prefix_scheme = prefix_scheme
        self.add_space_prefix = prefix_scheme != "never"
        self.strip_space = self.add_space_prefix if strip_space is None else bool(strip_space)
        self.split_words = bool(split_words)
        self.normalizer = _check_normalizer(normalizer)
        self.fuse_unk = bool(fuse_unk)
        self.ignore_merges = bool(ignore_merges)
        self.unk_id = unk_id
        self.pieces: dict[str, int] = {}       # what plain text may merge into
        self.special_tokens: dict[str, int] = {}
        self.byte_ids = np.full(256, -1, dtype=np.int32)
        for i, (tok, kind) in enumerate(zip(self.tokens, self.types)):
            if kind == SP_BYTE and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                self.byte_ids[int(tok[3:5], 16)] = i
            elif kind in (SP_NORMAL, SP_USER_DEFINED):
                self.pieces.setdefault(tok, i)
            if kind in (SP_CONTROL, SP_USER_DEFINED) and tok:
                self.special_tokens.setdefault(tok, i)
        if self.unk_id is None:
            unknown = np.flatnonzero(self.types == SP_UNKNOWN)
            self.unk_id = int(unknown[0]) if unknown.size else None
        self._matcher = TokenMatcher(self.special_tokens, always_split, lstrip, rstrip)
        self.always_split = self._matcher.always
        self._ranks: Optional[dict[tuple[str, str], int]] = None
        if merges is not None:
            self._ranks = {}
            for r, (a, b) in enumerate(merges):
                if a not in self.pieces or b not in self.pieces or a + b not in self.pieces:
                    raise ValueError(f"merge {r} ({a!r:.40}, {b!r:.40}) names a piece that is not in the vocabulary")
                self._ranks.setdefault((a, b), r)

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    add_bos: bool = True
    chat_template: Optional[str] = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"SentencePieceBPE(vocab_size={self.vocab_size}, special={len(self.special_tokens)})"

    def _encode_fragment(self, text: str, out: list) -> None:
        """Append the ids of plain text (spaces already '▁') to out."""
        if not text:
            return
        if self.ignore_merges and text in self.pieces:
            out.append(self.pieces[text])
            return
        syms = list(text)
        nxt = list(range(1, len(syms) + 1))      # linked list over the symbols
        prv = list(range(-1, len(syms) - 1))
        heap: list = []

        def push(i: int) -> None:  # the pair starting at symbol i, if it may merge
            j = nxt[i]
            if j >= len(syms):
                return
            if self._ranks is not None:   # tokenizers' BPE: listed pairs, lowest rank first
                rank = self._ranks.get((syms[i], syms[j]))
                if rank is not None:
                    heapq.heappush(heap, (rank, i, syms[i], syms[j]))
                return
            tid = self.pieces.get(syms[i] + syms[j])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], i, syms[i], syms[j]))

        for i in range(len(syms) - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] != a or j >= len(syms) or syms[j] != b:
                continue  # stale: one side was merged since this pair was pushed
            syms[i], syms[j] = a + b, ""
            nxt[i] = nxt[j]
            if nxt[j] < len(syms):
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        i, first = 0, len(out)
        while i < len(syms):
            sym = syms[i]
            tid = self.pieces.get(sym)
            if tid is not None:
                out.append(tid)
            else:
                for byte in sym.encode("utf-8"):
                    bid = int(self.byte_ids[byte])
                    if bid < 0:
                        if self.unk_id is None:
                            raise ValueError(f"cannot encode {sym!r}: no byte tokens and no unknown token")
                        if not (self.fuse_unk and len(out) > first and out[-1] == self.unk_id):
                            out.append(self.unk_id)
                        break
                    out.append(bid)
            i = nxt[i]

    def encode(self, text: str, allowed_special: Union[str, Iterable[str]] = ()) -> list[int]:
        """Token ids of text (no BOS: callers add `bos_id` when `add_bos`). allowed_special:
        "all" or a set of control/user-defined token strings recognised in the text (and
        the `always_split` tokens always). Each stretch of text between recognised tokens
        is normalised, gets its spaces as '▁' and a '▁' prefixed by `prefix_scheme` (so, by
        default, at the start and after each special token, as llama.cpp does)."""
        out: list[int] = []
        for piece, is_token, offset in self._matcher.split(text, self._matcher.allowed(allowed_special)):
            if is_token:
                out.append(self.special_tokens[piece])
                continue
            if self.normalizer:
                piece = unicodedata.normalize(self.normalizer, piece)
            piece = piece.replace(" ", SPACE)
            scheme = self.prefix_scheme
            if scheme == "piece" or (scheme == "always" or (scheme == "first" and offset == 0)) and \
                    not piece.startswith(SPACE):
                piece = SPACE + piece
            for word in (re.split(f"(?={SPACE})", piece) if self.split_words else (piece,)):
                self._encode_fragment(word, out)
        return out

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i adds to the text: '▁' as a space, <0xXX> as its byte, control
        tokens as nothing."""
        i = int(i)
        if not 0 <= i < len(self.tokens):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.tokens)})")
        kind = self.types[i]
        if kind == SP_BYTE and self.byte_ids[int(self.tokens[i][3:5], 16)] == i:
            return bytes([int(self.tokens[i][3:5], 16)])
        if kind in (SP_CONTROL, SP_UNUSED):
            return b""
        return self.tokens[i].replace(SPACE, " ").encode("utf-8")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids; the space the encoder prefixed is removed again (strip_space)."""
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        if self.strip_space and text.startswith(" "):
            text = text[1:]
        return text


class ByteTokenizer:
    """Bytes as tokens (nt's built-in corpus and llm.c-style byte models): id b = byte b."""

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    add_bos: bool = False
    chat_template: Optional[str] = None
    special_tokens: dict = {}
    vocab_size = 256

    def encode(self, text: str, allowed_special=()) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, i: int) -> bytes:
        return bytes([int(i)]) if 0 <= int(i) < 256 else b""

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def from_pretrained(path) -> Union[BPE, SentencePieceBPE]:
    """The tokenizer of a Hugging Face folder (tokenizer.json + tokenizer_config.json):
    see nt.hf_tokenizer.from_pretrained."""
    from .hf_tokenizer import from_pretrained as read   # it builds on this module's classes
    return read(path)
