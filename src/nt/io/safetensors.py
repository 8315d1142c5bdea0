"""The safetensors format, read and written by our own code.

    [8 bytes: N, little-endian u64][N bytes: JSON header][data]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(byte offsets into the data section) and may hold "__metadata__": {str: str}. Tensors
are stored row-major, little-endian, back to back in header order without gaps; the
header is padded with spaces to a multiple of 8 bytes so the data is aligned.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .common import FormatError

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation: refuse absurd headers


def save_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` (name -> NumPy array) to `path` atomically (temp file, fsync, rename)."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    arrays, offset = [], 0
    for name, value in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        a = np.asarray(value)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
        a = np.asarray(a, dtype=dtype, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, metadata) from a safetensors file, every field validated.

    Raises FormatError naming the file and the problem (truncation, a header that is not
    JSON, an unknown dtype, offsets that overlap, leave gaps or do not match the shape).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
        data = f.read()
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: __metadata__ must map str to str")
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{where}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise FormatError(f"{where}: unsupported dtype {dtype!r} (known: {sorted(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r}")
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if offs[1] - offs[0] != nbytes:
            raise FormatError(f"{where}: {dtype} {shape} needs {nbytes} bytes, data_offsets span {offs[1] - offs[0]}")
        entries.append((offs[0], offs[1], name, dtype, shape))
    entries.sort()
    expected = 0
    for begin, end, name, _, _ in entries:
        if begin != expected:
            raise FormatError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {expected} "
                              "(tensors overlap or leave a gap)")
        expected = end
    if expected != len(data):
        raise FormatError(f"{path}: the tensors cover {expected} data bytes but the file holds {len(data)}"
                          + (" (truncated)" if expected > len(data) else ""))
    tensors = {}
    for begin, end, name, dtype, shape in entries:  # in file order
        tensors[name] = np.frombuffer(data, dtype=DTYPES[dtype], count=math.prod(shape), offset=begin).reshape(shape)
    return tensors, metadata
