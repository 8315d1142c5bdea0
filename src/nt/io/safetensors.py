"""The safetensors format, read and written by our own code.

    [8 bytes: N, little-endian u64][N bytes: JSON header][data]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(byte offsets into the data section) and may hold "__metadata__": {str: str}. Tensors
are stored row-major, little-endian, back to back in header order without gaps; the
header is padded with spaces to a multiple of 8 bytes so the data is aligned.

BF16 (bfloat16, the top 16 bits of a float32) has no NumPy dtype: readers return it as
float32. `SafetensorsFile` reads tensors on demand from a memory map, so a model's
checkpoint is never read into memory whole.
"""
from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from .common import FormatError, atomic_write, expect, parse_json

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# how each dtype a reader accepts is stored: NumPy's types, and BF16 as its raw 16 bits
STORAGE = {**DTYPES, "BF16": "<u2"}
MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation: refuse absurd headers
MAX_DIMS = 32                   # NumPy 1's limit (NumPy 2 allows 64): past it reshape would fail


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it (offsets into the data section)."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def save_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None,
                     bf16: Iterable[str] = ()) -> None:
    """Write `tensors` (name -> NumPy array) to `path` atomically (temp file, fsync, rename).
    Tensors named in `bf16` are uint16 arrays of bfloat16 bit patterns (see float_to_bf16),
    stored as BF16."""
    bf16 = set(bf16)
    if not bf16 <= set(tensors):
        raise ValueError(f"bf16 names tensors that are not given: {sorted(bf16 - set(tensors))[:10]}")
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
        kind = _NAMES[dtype]
        if name in bf16:
            if kind != "U16":
                raise ValueError(f"tensor {name!r}: BF16 tensors are given as uint16 bit patterns, got {a.dtype}")
            kind = "BF16"
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a.reshape(-1))
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    atomic_write(path, [len(raw).to_bytes(8, "little"), raw, *arrays])


def read_safetensors_header(path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(name -> TensorInfo in file order, metadata, byte offset of the data section) of a
    safetensors file, every field validated against the file's size; no tensor is read.

    Raises FormatError naming the file and the problem (truncation, a header that is not
    strict JSON, an unknown dtype, a shape that is not a list of integers, offsets that
    overlap, leave gaps or do not match the shape). A missing `path` is FileNotFoundError.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise FormatError(f"{path}: header length {n} (byte 0) exceeds the file ({size} bytes) "
                              f"or the {MAX_HEADER}-byte limit")
        header = parse_json(f.read(n), f"{path}: header (bytes 8..{8 + n})")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must be an object mapping str to str, got {metadata!r:.80}")
    entries = [(name, _tensor_info(f"{path}: tensor {name!r}", info, data_size)) for name, info in header.items()]
    entries.sort(key=lambda e: (e[1].begin, e[1].end))
    expected = 0
    for name, t in entries:
        if t.begin != expected:
            raise FormatError(f"{path}: tensor {name!r} starts at byte {t.begin} of the data, expected {expected} "
                              "(tensors overlap or leave a gap)")
        expected = t.end
    if expected != data_size:
        raise FormatError(f"{path}: the tensors cover {expected} data bytes but the file holds {data_size}"
                          + (" (truncated)" if expected > data_size else ""))
    return dict(entries), metadata, 8 + n


def _tensor_info(where: str, info, data_size: int) -> TensorInfo:
    """One header entry, checked field by field; its byte count (an exact Python int) is
    compared with the data section's size before anything else uses the shape."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: entry must be an object with exactly dtype, shape, data_offsets")
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in STORAGE:
        raise FormatError(f"{where}: unsupported dtype {dtype!r:.80} (known: {sorted(STORAGE)})")
    expect(shape, list, where, "shape")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.80}")
    nbytes = math.prod(shape) * np.dtype(STORAGE[dtype]).itemsize
    if nbytes > data_size:
        raise FormatError(f"{where}: {dtype} {str(shape):.80} needs {nbytes} bytes, more than the {data_size} the data "
                          "section holds (truncated, or an absurd shape)")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                              for o in offs) and 0 <= offs[0] <= offs[1]):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r:.80}")
    if offs[1] - offs[0] != nbytes:
        raise FormatError(f"{where}: {dtype} {shape} needs {nbytes} bytes, data_offsets span {offs[1] - offs[0]}")
    return TensorInfo(dtype, tuple(shape), offs[0], offs[1])


def float_to_bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float values, rounded to the nearest bfloat16 (ties
    to even) through float32, as PyTorch rounds; a NaN stays a (quiet) NaN instead of
    rounding into inf."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16   # no overflow below NaN's patterns
    return np.where(np.isnan(x), (bits >> 16) | 0x0040, rounded).astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 numbers given as their uint16 bit patterns (exact: a
    bfloat16 is a float32 whose low 16 bits are zero)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> read-only array, metadata) from a safetensors file, the header validated
    first (read_safetensors_header); the data is read once and the arrays are views of it
    (BF16 tensors: float32 copies)."""
    path = Path(path)
    entries, metadata, data_offset = read_safetensors_header(path)
    data_size = max((t.end for t in entries.values()), default=0)
    with open(path, "rb") as f:
        f.seek(data_offset)
        data = f.read(data_size)
    if len(data) != data_size:  # the file shrank since its header was read
        raise FormatError(f"{path}: truncated: {len(data)} of {data_size} data bytes present")
    tensors = {}
    for name, t in entries.items():  # in file order
        count = math.prod(t.shape)
        tensors[name] = np.frombuffer(data, dtype=STORAGE[t.dtype], count=count, offset=t.begin).reshape(t.shape)
        if t.dtype == "BF16":
            tensors[name] = bf16_to_float32(tensors[name])
    return tensors, metadata


class SafetensorsFile:
    """A safetensors file read on demand: the header is validated when it is opened
    (read_safetensors_header), the data is memory-mapped and each tensor is read only when
    asked for, so only the pages of the tensors used are ever touched.

    >>> f = SafetensorsFile("model.safetensors")
    >>> f.tensors["wte"].shape, f.read("wte", np.float32)
    """

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_offset = read_safetensors_header(self.path)
        end = self.data_offset + max((t.end for t in self.tensors.values()), default=0)
        with open(self.path, "rb") as f:
            # mmap keeps its own handle; the map lives as long as this object or an array of it
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._map) < end:  # the file shrank since its header was read
            raise FormatError(f"{self.path}: truncated: {len(self._map)} bytes, the header needs {end}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name` as stored (BF16 as uint16 bit patterns): a read-only view of the map."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        count = math.prod(t.shape)
        return np.frombuffer(self._map, dtype=STORAGE[t.dtype], count=count,
                             offset=self.data_offset + t.begin).reshape(t.shape)

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor `name` converted to the float `dtype` (a new array). Only floating-point
        tensors (F64, F32, F16, BF16) convert; others are a FormatError naming the tensor."""
        t = self.tensors.get(name)
        if t is not None and t.dtype not in ("F64", "F32", "F16", "BF16"):
            raise FormatError(f"{self.path}: tensor {name!r} is {t.dtype}, expected a float type (F32, F16, BF16, F64)")
        values = self.raw(name)
        if t.dtype == "BF16":
            values = bf16_to_float32(values)
        return values.astype(dtype)
