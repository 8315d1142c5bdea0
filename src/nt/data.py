"""Built-in corpus and a batch loader over token arrays.

The built-in corpus is English every CPython install carries: the language reference
topics of `pydoc_data` plus the docstrings of the standard library's modules, classes and
functions, in a fixed order. It is built once and cached as llm.c token shards under
$NT_CACHE (default ~/.cache/nt): bytes as tokens (vocabulary 256) or a BPE trained on it.

`python -m nt.data prepare FILES... --out DIR` turns text files into a tokenizer and
train/val shards; `DataLoader` serves (B, T) batches from one or many shards.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .io.llmc import read_llmc_tokens, write_llmc_tokens
from .tokenizer import BPE, ENDOFTEXT, PRE_TOKENIZERS, text_chunks

BYTE_VOCAB = 256
DEFAULT_BPE_VOCAB = 4096


def cache_dir() -> Path:
    path = Path(os.environ.get("NT_CACHE", Path.home() / ".cache" / "nt"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    return docs


def builtin_corpus_text() -> str:
    """The built-in English corpus (several MB; identical for the same Python version)."""
    from pydoc_data.topics import topics
    parts = [topics[key] for key in sorted(topics)] + _stdlib_docstrings()
    return "\n\n".join(p.strip() for p in parts) + "\n"


def builtin_corpus(tokenizer: str = "bytes", val_fraction: float = 0.05,
                   vocab_size: int = DEFAULT_BPE_VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays of the built-in corpus, cached as llm.c shards.

    tokenizer="bytes": UTF-8 bytes as tokens (vocabulary 256). tokenizer="bpe": a BPE of
    `vocab_size` tokens trained on the corpus once and cached with the shards
    (`builtin_tokenizer()` returns it). The validation split is the last `val_fraction`.
    """
    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    version = f"py{sys.version_info[0]}{sys.version_info[1]}"
    tag = f"{version}_bytes" if tokenizer == "bytes" else f"{version}_bpe{vocab_size}"
    train_path = cache_dir() / f"builtin_{tag}_train.bin"
    val_path = cache_dir() / f"builtin_{tag}_val.bin"
    vocab = BYTE_VOCAB if tokenizer == "bytes" else vocab_size
    if not (train_path.exists() and val_path.exists()):
        text = builtin_corpus_text()
        if tokenizer == "bytes":
            tokens = text_to_byte_tokens(text)
        else:
            tokens = encode_text(builtin_tokenizer(vocab_size, text), text)
        split = int(len(tokens) * (1.0 - val_fraction))
        write_llmc_tokens(train_path, tokens[:split], _shard_dtype(vocab))
        write_llmc_tokens(val_path, tokens[split:], _shard_dtype(vocab))
    return read_llmc_tokens(train_path, vocab), read_llmc_tokens(val_path, vocab)


def builtin_tokenizer(vocab_size: int = DEFAULT_BPE_VOCAB, text: Optional[str] = None) -> BPE:
    """The BPE trained on the built-in corpus (trained on first use, then cached)."""
    path = cache_dir() / f"builtin_py{sys.version_info[0]}{sys.version_info[1]}_bpe{vocab_size}_tokenizer"
    if (path / "merges.txt").exists():
        return BPE.load(path)
    bpe = BPE.train(text if text is not None else builtin_corpus_text(), vocab_size)
    bpe.save(path)
    return bpe


def _shard_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def encode_text(bpe: BPE, text: str, chunk_chars: int = 1 << 20, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """BPE token ids of a (long) text as an integer array, encoded chunk by chunk;
    `progress(n_chars_done)` is called after each chunk."""
    parts, done = [], 0
    for chunk in text_chunks(text, chunk_chars):
        parts.append(np.asarray(bpe.encode_ordinary(chunk), dtype=np.uint32))
        done += len(chunk)
        if progress is not None:
            progress(done)
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    return tokens.astype(_shard_dtype(bpe.vocab_size))


def text_to_byte_tokens(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as token ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def byte_tokens_to_text(tokens) -> str:
    """Inverse of text_to_byte_tokens (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class DataLoader:
    """(B, T) inputs and next-token targets from one or many token shards.

    `shards` is one 1-D token array, or a list of arrays and/or paths of llm.c shards
    (memory-mapped). Each shard is cut into windows of T+1 tokens starting at multiples of
    T; windows never straddle two shards. Windows are served in order (like llm.c) or in
    a new seeded random order per epoch; rank/world_size deal each epoch's windows out
    to data-parallel workers without overlap (the last few that do not fill a batch on
    every rank are skipped that epoch). Batches are written into two preallocated int32
    arrays, so iterating allocates nothing. `state()`/`set_state()` save and restore the
    position for checkpoints.
    """

    def __init__(self, shards: Union[np.ndarray, Sequence[Union[np.ndarray, str, os.PathLike]]], B: int, T: int,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 vocab_size: Optional[int] = None):
        if isinstance(shards, np.ndarray) and shards.ndim == 1:
            shards = [shards]
        if B <= 0 or T <= 0:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(shards) == 0:
            raise ValueError("DataLoader needs at least one shard")
        self.shards = []
        for i, shard in enumerate(shards):
            name = str(shard) if isinstance(shard, (str, os.PathLike)) else f"shard {i}"
            tokens = read_llmc_tokens(shard, vocab_size) if isinstance(shard, (str, os.PathLike)) else np.asarray(shard)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise ValueError(f"{name}: tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
            if tokens.size < T + 1:
                raise ValueError(f"{name}: {tokens.size} tokens are too few for one window of T+1 = {T + 1}")
            # checked in the shard's own dtype: batches are int32, and a cast must not
            # turn id 2**32 + 5 into 5 or accept a negative id
            upper = min(vocab_size if vocab_size is not None else 2 ** 31, 2 ** 31)
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= upper:
                bad = lo if lo < 0 else hi
                where = int(np.argmax((tokens < 0) | (tokens >= upper)))
                what = f"vocab size {vocab_size}" if vocab_size is not None and upper == vocab_size else "int32 range"
                raise ValueError(f"{name}: token id {bad} at index {where} is outside [0, {upper}) ({what})")
            self.shards.append(tokens)
        self.B, self.T = B, T
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        # global window w lives in shard s where window_base[s] <= w < window_base[s + 1]
        self.window_base = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([(t.size - 1) // T for t in self.shards], out=self.window_base[1:])
        self.n_windows = int(self.window_base[-1])
        self.per_rank = self.n_windows // world_size // B * B  # whole batches per rank
        if self.per_rank < B:
            total = sum(t.size for t in self.shards)
            raise ValueError(f"{total} tokens ({self.n_windows} windows of T+1={T + 1}) are too few for one "
                             f"batch of B={B} per rank on {world_size} rank(s)")
        self.x = np.empty((B, T), dtype=np.int32)
        self.y = np.empty((B, T), dtype=np.int32)
        self.epoch = 0
        self.position = 0  # index of the next window of this rank, within the epoch
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        """This rank's windows for the current epoch: every rank draws the same global
        permutation and takes every world_size-th entry, so ranks never overlap."""
        windows = np.arange(self.n_windows)
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(windows)
        return windows[self.rank:self.per_rank * self.world_size:self.world_size]

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.B

    def window(self, w: int) -> np.ndarray:
        """The T+1 tokens of global window w."""
        s = int(np.searchsorted(self.window_base, w, side="right")) - 1
        start = (w - int(self.window_base[s])) * self.T
        return self.shards[s][start:start + self.T + 1]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets), each (B, T) int32; wraps to a new epoch at the end."""
        if self.position + self.B > self.per_rank:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        T = self.T
        for b in range(self.B):
            window = self.window(int(self._order[self.position + b]))
            self.x[b] = window[:T]
            self.y[b] = window[1:]
        self.position += self.B
        return self.x, self.y

    def state(self) -> dict:
        """Where the loader is (for checkpoints): restore with `set_state`."""
        return {"epoch": self.epoch, "position": self.position, "n_windows": self.n_windows,
                "seed": self.seed, "shuffle": self.shuffle}

    def set_state(self, state: dict) -> None:
        """Continue from a `state()`; the data (window count) and shuffle seed must match."""
        for key in ("n_windows", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state is for {key}={state[key]}, this loader has {getattr(self, key)} "
                                 "(different data or settings)")
        for key in ("epoch", "position"):
            if isinstance(state[key], bool) or not isinstance(state[key], (int, np.integer)) or state[key] < 0:
                raise ValueError(f"loader state {key!r} must be an integer >= 0, got {state[key]!r:.40}")
        position = int(state["position"])
        if position > self.per_rank:
            raise ValueError(f"loader position {position} is outside this rank's {self.per_rank} windows")
        self.epoch, self.position = int(state["epoch"]), position
        self._order = self._epoch_order()


# ---------------------------------------------------------------------- python -m nt.data prepare

def prepare(files: Sequence[Union[str, os.PathLike]], out, vocab_size: int = DEFAULT_BPE_VOCAB,
            tokenizer: Union[None, str, os.PathLike, BPE] = None, val_fraction: float = 0.05,
            shard_tokens: int = 100_000_000, verbose: bool = True, pre: str = "gpt2") -> dict:
    """Text files -> out/tokenizer/ (trained with pre-tokenizer `pre`, or the one given) +
    out/train_NNNNNN.bin and out/val_NNNNNN.bin shards of at most `shard_tokens` tokens,
    + out/meta.json.

    Every file starts with <|endoftext|> (when the tokenizer has it), as documents do in
    llm.c's shards. The last `val_fraction` of the token stream is the validation split.
    Shards are uint16 llm.c shards, or version-2 uint32 ones past 65536 tokens.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    for name in files:
        try:
            texts.append(Path(name).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise FileNotFoundError(f"cannot read {name}: {e.strerror}") from None
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    if isinstance(tokenizer, BPE):
        bpe = tokenizer
    elif tokenizer is not None:
        bpe = BPE.load(tokenizer)
    else:
        t0 = time.perf_counter()
        bpe = BPE.train("".join(texts), vocab_size, pre=pre)
        say(f"trained BPE: {bpe.vocab_size} tokens in {time.perf_counter() - t0:.1f} s")
    bpe.save(out / "tokenizer")
    total = sum(len(t) for t in texts)
    done = 0
    parts = []
    eot = bpe.special_tokens.get(ENDOFTEXT)
    for text in texts:
        if eot is not None:
            parts.append(np.array([eot], dtype=np.uint32))
        base = done
        parts.append(encode_text(bpe, text, progress=lambda n: _bar(base + n, total, "encoding") if verbose else None))
        done += len(text)
    tokens = np.concatenate(parts).astype(_shard_dtype(bpe.vocab_size))
    split = int(len(tokens) * (1.0 - val_fraction))
    meta = {"vocab_size": bpe.vocab_size, "tokens": int(len(tokens)), "train": [], "val": []}
    for kind, part in (("train", tokens[:split]), ("val", tokens[split:])):
        for i, start in enumerate(range(0, max(len(part), 1), shard_tokens)):
            name = f"{kind}_{i:06d}.bin"
            write_llmc_tokens(out / name, part[start:start + shard_tokens], _shard_dtype(bpe.vocab_size))
            meta[kind].append(name)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    say(f"{len(tokens):,} tokens ({done / max(len(tokens), 1):.2f} chars/token): "
        f"{len(meta['train'])} train + {len(meta['val'])} val shards in {out}")
    return meta


def _bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} chars", end="\n" if done >= total else "",
          file=sys.stderr, flush=True)


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m nt.data", description="nt data tools")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="text files -> BPE tokenizer + train/val token shards")
    prep.add_argument("files", nargs="+", help="UTF-8 text files")
    prep.add_argument("--out", required=True, help="output folder")
    group = prep.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=int, default=DEFAULT_BPE_VOCAB, help="train a BPE of this size")
    group.add_argument("--tokenizer", default=None, help="use this tokenizer folder (vocab.json + merges.txt)")
    prep.add_argument("--pre", choices=PRE_TOKENIZERS, default="gpt2",
                      help="pre-tokenizer of a trained BPE (a given --tokenizer keeps its own)")
    prep.add_argument("--val-fraction", type=float, default=0.05)
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard at most")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    try:
        prepare(args.files, args.out, args.vocab_size, args.tokenizer, args.val_fraction, args.shard_tokens,
                pre=args.pre)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
