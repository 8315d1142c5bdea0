"""Built-in corpus and a batch loader over token arrays.

The built-in corpus is English every CPython install carries: the language reference
topics of `pydoc_data` plus the docstrings of the standard library's modules, classes and
functions, in a fixed order. It is built once and cached as llm.c token shards (bytes as
tokens, vocabulary 256) under $NT_CACHE (default ~/.cache/nt).
"""
from __future__ import annotations

import ast
import os
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

from .io.llmc import read_llmc_tokens, write_llmc_tokens

BYTE_VOCAB = 256


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


def builtin_corpus(val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) byte-token arrays of the built-in corpus, cached as llm.c shards.

    The validation split is the last `val_fraction` of the text.
    """
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_bytes"
    train_path = cache_dir() / f"builtin_{tag}_train.bin"
    val_path = cache_dir() / f"builtin_{tag}_val.bin"
    if not (train_path.exists() and val_path.exists()):
        tokens = np.frombuffer(builtin_corpus_text().encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        split = int(len(tokens) * (1.0 - val_fraction))
        write_llmc_tokens(train_path, tokens[:split])
        write_llmc_tokens(val_path, tokens[split:])
    return read_llmc_tokens(train_path, BYTE_VOCAB), read_llmc_tokens(val_path, BYTE_VOCAB)


def text_to_byte_tokens(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as token ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def byte_tokens_to_text(tokens) -> str:
    """Inverse of text_to_byte_tokens (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class DataLoader:
    """(B, T) inputs and next-token targets from a 1-D token array.

    Windows of T+1 tokens start at multiples of B*T, in order (like llm.c) or in a
    shuffled order per epoch (seeded). Batches are written into two preallocated int32
    arrays, so iterating allocates nothing. rank/world_size split the windows so that
    data-parallel workers never see the same window.
    """

    def __init__(self, tokens: np.ndarray, B: int, T: int, shuffle: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, vocab_size: Optional[int] = None):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if B <= 0 or T <= 0:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
            raise ValueError(f"token id {int(tokens.max())} >= vocab size {vocab_size}")
        self.tokens, self.B, self.T = tokens, B, T
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        n_windows = (tokens.size - 1) // T
        self.per_rank = n_windows // world_size // B * B  # whole batches per rank
        if self.per_rank < B:
            raise ValueError(f"{tokens.size} tokens are too few for one batch of B={B} x T={T} "
                             f"per rank (need at least {B * T * world_size + 1})")
        self.x = np.empty((B, T), dtype=np.int32)
        self.y = np.empty((B, T), dtype=np.int32)
        self.epoch = 0
        self.position = 0  # index of the next window of this rank, within the epoch
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        windows = np.arange(self.rank, self.per_rank * self.world_size, self.world_size)
        if self.shuffle:
            np.random.default_rng((self.seed, self.epoch)).shuffle(windows)
        return windows

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.B

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (inputs, targets), each (B, T) int32; wraps to a new epoch at the end."""
        if self.position + self.B > self.per_rank:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        T = self.T
        for b in range(self.B):
            start = int(self._order[self.position + b]) * T
            window = self.tokens[start:start + T + 1]
            self.x[b] = window[:T]
            self.y[b] = window[1:]
        self.position += self.B
        return self.x, self.y

    def state(self) -> dict:
        """Where the loader is (for checkpoints): restore with `set_state`."""
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()
