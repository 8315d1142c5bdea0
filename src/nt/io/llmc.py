"""llm.c's file formats: GPT-2 checkpoints (magic 20240326) and token shards (20240520).

Both start with a 256 x int32 header. Checkpoint header: magic, version (3 = fp32 with a
padded vocabulary), maxT, V, L, NH, C, Vp; then every parameter as fp32 in llm.c's order.
Token shard header: magic, version 1, token count; then the tokens as uint16.
Vocabularies beyond 65536 tokens use nt's uint32 variant of the shard: the same magic and
header with version 2, then the tokens as little-endian uint32 (llm.c itself rejects
version 2 with a clear error rather than misreading it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..models.gpt2 import GPT2Config, param_layout
from .common import FormatError, atomic_write

HEADER_INTS = 256
CHECKPOINT_MAGIC = 20240326
CHECKPOINT_VERSION_FP32 = 3
TOKENS_MAGIC = 20240520
TOKENS_VERSION = 1         # uint16 tokens (llm.c)
TOKENS_VERSION_U32 = 2     # uint32 tokens (nt's extension)
_TOKEN_DTYPES = {TOKENS_VERSION: np.dtype("<u2"), TOKENS_VERSION_U32: np.dtype("<u4")}


def _read_header(path: Path, f) -> np.ndarray:
    raw = f.read(HEADER_INTS * 4)
    if len(raw) < HEADER_INTS * 4:
        raise FormatError(f"{path}: truncated header ({len(raw)} of {HEADER_INTS * 4} bytes)")
    return np.frombuffer(raw, dtype="<i4")


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
    atomic_write(path, [header, flat.astype("<f4", copy=False)])


def read_llmc_tokens(path, vocab_size: int | None = None) -> np.ndarray:
    """The tokens of an llm.c shard as a uint16 array (uint32 for version-2 shards),
    memory-mapped and read-only. With `vocab_size`, every token is checked to be below it.
    """
    path = Path(path)
    with open(path, "rb") as f:
        h = _read_header(path, f)
    if h[0] != TOKENS_MAGIC:
        raise FormatError(f"{path}: bad magic {h[0]}, expected {TOKENS_MAGIC} (an llm.c token shard)")
    if h[1] not in _TOKEN_DTYPES:
        raise FormatError(f"{path}: unsupported token shard version {h[1]}, expected {TOKENS_VERSION} (uint16) "
                          f"or {TOKENS_VERSION_U32} (uint32)")
    dtype = _TOKEN_DTYPES[int(h[1])]
    n = int(h[2])
    size = path.stat().st_size - HEADER_INTS * 4
    if n < 0 or size < dtype.itemsize * n:
        raise FormatError(f"{path}: truncated: header promises {n} tokens, file holds {max(size, 0) // dtype.itemsize}")
    if size > dtype.itemsize * n:
        raise FormatError(f"{path}: header promises {n} tokens but the file holds {size // dtype.itemsize}")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n,)) if n else np.zeros(0, dtype)
    if vocab_size is not None and n:
        hi = int(tokens.max())
        if hi >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise FormatError(f"{path}: token id {hi} >= vocab size {vocab_size} (first bad one at index {where})")
    return tokens


def write_llmc_tokens(path, tokens, dtype=np.uint16) -> None:
    """Write tokens as an llm.c uint16 shard (or, with dtype=np.uint32, nt's version-2
    uint32 shard for vocabularies beyond 65536), atomically."""
    tokens = np.asarray(tokens)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"token shards hold uint16 or uint32 ids, not {dtype}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    hi = np.iinfo(dtype).max
    if tokens.size and (tokens.dtype.kind not in "iu" or int(tokens.min()) < 0 or int(tokens.max()) > hi):
        raise ValueError(f"this shard holds {dtype.name} ids: every token must be an integer in [0, {hi}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    version = TOKENS_VERSION if dtype == np.uint16 else TOKENS_VERSION_U32
    header[:3] = [TOKENS_MAGIC, version, tokens.size]
    atomic_write(path, [header, tokens.astype(dtype.newbyteorder("<"))])
