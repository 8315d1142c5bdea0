"""What every file format of nt.io shares: the error type, atomic writes, bounded JSON.

Every reader treats its file as hostile: each number read from it is checked against the
file's real size and sane limits before it sizes an allocation, and every problem is a
`FormatError` that names the file, the field and, where there is one, the byte offset.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

# JSON nt reads (safetensors headers, configs, checkpoint state, tokenizer files) is
# refused past these: real files nest a handful of levels and stay far below the size
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 256 * 1024 * 1024


class FormatError(ValueError):
    """A file is not what it claims to be (bad magic, version, size, field or contents).

    The message names the file, the field and, where known, the byte offset."""


def atomic_write(path, chunks: Iterable) -> None:
    """Write byte-like chunks (bytes, or NumPy arrays written as their raw bytes) to a
    temporary name beside `path`, fsync, then rename: a crash never leaves half a file.
    A single bytes object is one chunk (not a sequence of ints)."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                if isinstance(chunk, (bytes, bytearray, memoryview)):
                    f.write(chunk)
                else:
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """atomic_write of UTF-8 text."""
    atomic_write(path, [text.encode("utf-8")])


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _max_depth(text: str) -> int:
    """Deepest bracket nesting of JSON text, strings skipped, without recursion."""
    skeleton = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8"), dtype=np.uint8)
    if skeleton.size == 0:
        return 0
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    closes = (skeleton == ord("]")) | (skeleton == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max())


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def parse_json(raw: bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode UTF-8 JSON bytes strictly: duplicate keys, NaN/Infinity literals, nesting
    deeper than `max_depth` and invalid UTF-8 are FormatErrors naming `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    # Python's decoder recurses once per nesting level: measure the nesting first, so a
    # deep file is refused before it can raise RecursionError
    if _max_depth(text) > max_depth:
        raise FormatError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                         parse_float=_finite_float)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{where}: not valid JSON: {e}") from None
    return obj


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number literal as a float; one too large for a float (1e999) is refused rather
    than read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return value


def read_json(path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              what: Optional[str] = None) -> Any:
    """The decoded JSON of a file, bounded in size and depth (see parse_json). A missing
    or unreadable file is a FormatError too (`what` says what the file should have been)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FormatError(f"{path}: {size} bytes is more than the {max_bytes} allowed for this JSON file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{path}: missing" + (f" ({what})" if what else "")) from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    return parse_json(raw, str(path), max_depth)


def require_finite(values: np.ndarray, where: str) -> np.ndarray:
    """`values` if every one is finite, else a FormatError naming `where`, how many are not
    and the first one's index: a model with a NaN or inf weight only produces NaN."""
    finite = np.isfinite(values)
    if not finite.all():
        first = np.unravel_index(int(np.argmin(finite)), values.shape)
        raise FormatError(f"{where}: {int(values.size - np.count_nonzero(finite))} of {values.size} values are "
                          f"NaN or infinite (the first at index {tuple(int(i) for i in first)})")
    return values


def expect(value, kind, where: str, field: str):
    """`value` if it is of `kind` (bool is not an int here), else a FormatError naming the field."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise FormatError(f"{where}: {field} must be {names}, got {type(value).__name__} {value!r:.80}")
    return value
