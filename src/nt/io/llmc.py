"""llm.c's file formats: GPT-2 checkpoints (magic 20240326) and token shards (20240520).

Both start with a 256 x int32 header. Checkpoint header: magic, version (3 = fp32 with a
padded vocabulary), maxT, V, L, NH, C, Vp; then every parameter as fp32 in llm.c's order.
Token shard header: magic, version 1, token count; then the tokens as uint16.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..models.gpt2 import GPT2Config, param_layout

HEADER_INTS = 256
CHECKPOINT_MAGIC = 20240326
CHECKPOINT_VERSION_FP32 = 3
TOKENS_MAGIC = 20240520
TOKENS_VERSION = 1


class FormatError(ValueError):
    """A file is not what it claims to be (bad magic, version, size or contents)."""


def _read_header(path: Path, f) -> np.ndarray:
    raw = f.read(HEADER_INTS * 4)
    if len(raw) < HEADER_INTS * 4:
        raise FormatError(f"{path}: truncated header ({len(raw)} of {HEADER_INTS * 4} bytes)")
    return np.frombuffer(raw, dtype="<i4")


def _atomic_write(path: Path, chunks) -> None:
    """Write to a temporary name, fsync, rename: a crash never leaves half a file at `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_llmc_checkpoint(path) -> tuple[GPT2Config, np.ndarray]:
    """(config, flat fp32 parameters in llm.c order) from an llm.c GPT-2 checkpoint."""
    path = Path(path)
    with open(path, "rb") as f:
        h = _read_header(path, f)
        if h[0] != CHECKPOINT_MAGIC:
            raise FormatError(f"{path}: bad magic {h[0]}, expected {CHECKPOINT_MAGIC} (an llm.c GPT-2 checkpoint)")
        if h[1] != CHECKPOINT_VERSION_FP32:
            hint = " (version 5 is llm.c's bf16 export; write an fp32 one)" if h[1] == 5 else ""
            raise FormatError(f"{path}: unsupported checkpoint version {h[1]}, expected {CHECKPOINT_VERSION_FP32}{hint}")
        maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
        try:
            config = GPT2Config(block_size=maxT, vocab_size=V, n_layer=L, n_head=NH, n_embd=C)
        except ValueError as e:
            raise FormatError(f"{path}: header describes an impossible model: {e}") from None
        if Vp != config.padded_vocab_size:
            raise FormatError(f"{path}: padded vocab {Vp} is not V={V} rounded up to 128 ({config.padded_vocab_size})")
        count = sum(int(np.prod(shape)) for _, shape, _ in param_layout(config))
        flat = np.fromfile(f, dtype="<f4", count=count)
        if flat.size != count:
            raise FormatError(f"{path}: truncated: {flat.size} of {count} parameters present")
        if f.read(1):
            raise FormatError(f"{path}: {count} parameters expected, but the file is longer")
    return config, flat.astype(np.float32, copy=False)


def write_llmc_checkpoint(path, config: GPT2Config, flat: np.ndarray) -> None:
    """Write fp32 parameters (flat, llm.c order) with a version-3 header, atomically."""
    count = sum(int(np.prod(shape)) for _, shape, _ in param_layout(config))
    if flat.shape != (count,):
        raise ValueError(f"expected {count} parameters for {config}, got shape {flat.shape}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [CHECKPOINT_MAGIC, CHECKPOINT_VERSION_FP32, config.block_size, config.vocab_size,
                  config.n_layer, config.n_head, config.n_embd, config.padded_vocab_size]
    _atomic_write(path, [header, flat.astype("<f4", copy=False)])


def read_llmc_tokens(path, vocab_size: int | None = None) -> np.ndarray:
    """The tokens of an llm.c shard as a uint16 array (memory-mapped, read-only).

    With `vocab_size`, every token is checked to be below it.
    """
    path = Path(path)
    with open(path, "rb") as f:
        h = _read_header(path, f)
    if h[0] != TOKENS_MAGIC:
        raise FormatError(f"{path}: bad magic {h[0]}, expected {TOKENS_MAGIC} (an llm.c token shard)")
    if h[1] != TOKENS_VERSION:
        raise FormatError(f"{path}: unsupported token shard version {h[1]}, expected {TOKENS_VERSION}")
    n = int(h[2])
    size = path.stat().st_size - HEADER_INTS * 4
    if n < 0 or size < 2 * n:
        raise FormatError(f"{path}: truncated: header promises {n} tokens, file holds {max(size, 0) // 2}")
    if size > 2 * n:
        raise FormatError(f"{path}: header promises {n} tokens but the file holds {size // 2}")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(n,)) if n else np.zeros(0, np.uint16)
    if vocab_size is not None and n:
        hi = int(tokens.max())
        if hi >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise FormatError(f"{path}: token id {hi} >= vocab size {vocab_size} (first bad one at index {where})")
    return tokens


def write_llmc_tokens(path, tokens) -> None:
    """Write tokens (values in [0, 65535]) as an llm.c uint16 shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.dtype.kind not in "iu" or int(tokens.min()) < 0 or int(tokens.max()) > 65535):
        raise ValueError("llm.c token shards hold uint16 ids: every token must be an integer in [0, 65535]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [TOKENS_MAGIC, TOKENS_VERSION, tokens.size]
    _atomic_write(path, [header, tokens.astype("<u2")])
