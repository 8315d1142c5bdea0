"""llm.c's file formats: GPT-2 checkpoints (magic 20240326) and token shards (20240520).

Both start with a 256 x int32 header. Checkpoint header: magic, version (3 = fp32 with a
padded vocabulary), maxT, V, L, NH, C, Vp; then every parameter as fp32 in llm.c's order.
Token shard header: magic, version 1, token count; then the tokens as uint16.
Vocabularies beyond 65536 tokens use nt's uint32 variant of the shard: the same magic and
header with version 2, then the tokens as little-endian uint32 (llm.c itself rejects
version 2 with a clear error rather than misreading it).

This module knows the formats only, not nt's models: `GPT2.from_llmc` turns the sizes a
checkpoint header declares into a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import FormatError, atomic_write

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
CHECKPOINT_MAGIC = 20240326
CHECKPOINT_VERSION_FP32 = 3
TOKENS_MAGIC = 20240520
TOKENS_VERSION = 1         # uint16 tokens (llm.c)
TOKENS_VERSION_U32 = 2     # uint32 tokens (nt's extension)
_TOKEN_DTYPES = {TOKENS_VERSION: np.dtype("<u2"), TOKENS_VERSION_U32: np.dtype("<u4")}
_INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class LlmcSizes:
    """The model sizes an llm.c checkpoint header declares (header ints 2..7)."""
    block_size: int          # maxT
    vocab_size: int          # V
    n_layer: int             # L
    n_head: int              # NH
    n_embd: int              # C
    padded_vocab_size: int   # Vp

    FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "padded_vocab_size")

    @classmethod
    def of(cls, config) -> "LlmcSizes":
        """The sizes of anything with these six attributes (a GPT2Config, say)."""
        return cls(*(int(getattr(config, name)) for name in cls.FIELDS))

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Every parameter's shape, in llm.c's order (wte, wpe, ln1w, ln1b, qkvw, qkvb,
        attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb, lnfw, lnfb)."""
        Vp, T, L, C = self.padded_vocab_size, self.block_size, self.n_layer, self.n_embd
        return [(Vp, C), (T, C), (L, C), (L, C), (L, 3 * C, C), (L, 3 * C), (L, C, C), (L, C),
                (L, C), (L, C), (L, 4 * C, C), (L, 4 * C), (L, C, 4 * C), (L, C), (C,), (C,)]

    def param_count(self) -> int:
        """The number of fp32 parameters, as an exact Python int (no overflow)."""
        total = 0
        for shape in self.param_shapes():
            count = 1
            for d in shape:
                count *= d
            total += count
        return total


def _read_header(path: Path, f) -> np.ndarray:
    raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise FormatError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    return np.frombuffer(raw, dtype="<i4")


def read_llmc_checkpoint(path) -> tuple[LlmcSizes, np.ndarray]:
    """(sizes the header declares, flat fp32 parameters in llm.c order) of an llm.c GPT-2
    checkpoint. The sizes are checked to be positive, Vp >= V, and to account for the
    file's size exactly before any parameter is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        h = _read_header(path, f)
        if h[0] != CHECKPOINT_MAGIC:
            raise FormatError(f"{path}: bad magic {h[0]}, expected {CHECKPOINT_MAGIC} (an llm.c GPT-2 checkpoint)")
        if h[1] != CHECKPOINT_VERSION_FP32:
            hint = " (version 5 is llm.c's bf16 export; write an fp32 one)" if h[1] == 5 else ""
            raise FormatError(f"{path}: unsupported checkpoint version {h[1]}, expected {CHECKPOINT_VERSION_FP32}{hint}")
        sizes = LlmcSizes(*(int(x) for x in h[2:8]))
        for index, name in enumerate(LlmcSizes.FIELDS, 2):
            if getattr(sizes, name) <= 0:
                raise FormatError(f"{path}: header {name} (int {index}, byte {4 * index}) must be positive, "
                                  f"got {getattr(sizes, name)}")
        if sizes.padded_vocab_size < sizes.vocab_size:
            raise FormatError(f"{path}: header padded vocab {sizes.padded_vocab_size} (byte 28) is smaller "
                              f"than the vocab {sizes.vocab_size}")
        # the header's sizes are only claims: the file must hold exactly that many floats
        # before anything is allocated for them
        count = sizes.param_count()
        have = size - HEADER_BYTES
        if have != 4 * count:
            problem = "truncated" if have < 4 * count else "longer than that"
            raise FormatError(f"{path}: header sizes {sizes} need {count} fp32 parameters ({4 * count} bytes "
                              f"after the {HEADER_BYTES}-byte header), the file holds {have} bytes: {problem}")
        flat = np.fromfile(f, dtype="<f4", count=count)
    if flat.size != count:  # the file shrank while being read
        raise FormatError(f"{path}: truncated: {flat.size} of {count} parameters present")
    return sizes, flat.astype(np.float32, copy=False)


def write_llmc_checkpoint(path, sizes, flat: np.ndarray) -> None:
    """Write fp32 parameters (flat, llm.c order) with a version-3 header, atomically.

    sizes: an LlmcSizes, or anything with its six attributes (a GPT2Config)."""
    sizes = LlmcSizes.of(sizes)
    values = [getattr(sizes, name) for name in LlmcSizes.FIELDS]
    if not all(0 < v <= _INT32_MAX for v in values) or sizes.padded_vocab_size < sizes.vocab_size:
        raise ValueError(f"sizes {sizes} do not fit an llm.c header (positive int32s, Vp >= V)")
    count = sizes.param_count()
    if flat.shape != (count,):
        raise ValueError(f"expected {count} parameters for {sizes}, got shape {flat.shape}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [CHECKPOINT_MAGIC, CHECKPOINT_VERSION_FP32, *values]
    atomic_write(path, [header, flat.astype("<f4", copy=False)])


def read_llmc_tokens(path, vocab_size: int | None = None) -> np.ndarray:
    """The tokens of an llm.c shard as a uint16 array (uint32 for version-2 shards),
    memory-mapped and read-only. With `vocab_size`, every token is checked to be below it.

    A missing `path` is the caller's FileNotFoundError; anything wrong inside the file is
    a FormatError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        h = _read_header(path, f)
    if h[0] != TOKENS_MAGIC:
        raise FormatError(f"{path}: bad magic {h[0]}, expected {TOKENS_MAGIC} (an llm.c token shard)")
    version = int(h[1])
    if version not in _TOKEN_DTYPES:
        raise FormatError(f"{path}: unsupported token shard version {version}, expected {TOKENS_VERSION} (uint16) "
                          f"or {TOKENS_VERSION_U32} (uint32)")
    dtype = _TOKEN_DTYPES[version]
    n = int(h[2])
    have = size - HEADER_BYTES
    if n < 0:
        raise FormatError(f"{path}: header token count (byte 8) is negative: {n}")
    if have < dtype.itemsize * n:
        raise FormatError(f"{path}: truncated: header promises {n} tokens, file holds {have // dtype.itemsize}")
    if have > dtype.itemsize * n:
        raise FormatError(f"{path}: header promises {n} tokens but the file holds {have // dtype.itemsize}")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,)) if n else np.zeros(0, dtype)
    if vocab_size is not None and n:
        hi = int(tokens.max())
        if hi >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise FormatError(f"{path}: token id {hi} >= vocab size {vocab_size} (first bad one at index {where}, "
                              f"byte {HEADER_BYTES + where * dtype.itemsize})")
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
    if tokens.size > _INT32_MAX:
        raise ValueError(f"a shard's header counts at most {_INT32_MAX} tokens, got {tokens.size}")
    hi = np.iinfo(dtype).max
    if tokens.size and (tokens.dtype.kind not in "iu" or int(tokens.min()) < 0 or int(tokens.max()) > hi):
        raise ValueError(f"this shard holds {dtype.name} ids: every token must be an integer in [0, {hi}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    version = TOKENS_VERSION if dtype == np.uint16 else TOKENS_VERSION_U32
    header[:3] = [TOKENS_MAGIC, version, tokens.size]
    atomic_write(path, [header, tokens.astype(dtype.newbyteorder("<"))])
