"""GGUF, llama.cpp's model file: read (memory-mapped), dequantise, quantise, write.

This module knows the format only; which tensors and keys make an nt GPT2 or Llama is
nt.models.gguf's business (load, write, tokenizer_from_metadata).

File layout (little-endian, versions 2 and 3):

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    data section: tensor bytes at their offsets (each a multiple of the alignment)

A string is u64 length + UTF-8 bytes; an array is u32 element type + u64 count + elements.

Shape convention. ggml lists dimensions fastest-varying first: ne[0] is the length of a
row (the contiguous axis, the axis quantisation blocks run along). This module speaks
NumPy: every shape it returns or takes is row-major with the ne[] order reversed, so a
tensor with ne = [C, OC] is the NumPy array of shape (OC, C), row `o` holding ne[0] = C
contiguous values. A linear layer y = x @ W^T stores W as (out, in), i.e. ne = [in, out].

Every count, length and offset read from a file is checked against the bytes the file
actually has before anything is allocated: a corrupt or hostile file raises FormatError
naming the file, the key or tensor, and the byte offset.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numba
import numpy as np

from ..kernels.cpu import bitnet, quant
from .common import FormatError, atomic_write

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 16    # nested arrays deeper than this are rejected (no real file nests)

# metadata value types
(UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64,
 FLOAT64) = range(13)
VALUE_TYPE_NAMES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool",
                    "string", "array", "uint64", "int64", "float64"]
_VALUE_DTYPES = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4",
                 INT32: "<i4", FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8",
                 FLOAT64: "<f8"}
_STRUCT_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                   FLOAT32: "<f", BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_MIN_VALUE_BYTES = {**{t: np.dtype(d).itemsize for t, d in _VALUE_DTYPES.items()},
                    STRING: 8, ARRAY: 12}

# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}
GGML_TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

# types nt turns into float32: a Numba kernel per block format, NumPy casts for plain numbers
_DEQUANTIZE = {
    "F16": quant.dequantize_f16, "BF16": quant.dequantize_bf16,
    "Q4_0": quant.dequantize_q4_0, "Q4_1": quant.dequantize_q4_1,
    "Q5_0": quant.dequantize_q5_0, "Q5_1": quant.dequantize_q5_1, "Q8_0": quant.dequantize_q8_0,
    "Q2_K": quant.dequantize_q2_k, "Q3_K": quant.dequantize_q3_k, "Q4_K": quant.dequantize_q4_k,
    "Q5_K": quant.dequantize_q5_k, "Q6_K": quant.dequantize_q6_k, "TQ2_0": bitnet.dequantize_tq2_0,
    "TQ1_0": bitnet.dequantize_tq1_0,
}
_CAST = {"F32": "<f4", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
DEQUANTIZE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                    "Q4_K", "Q5_K", "Q6_K", "TQ2_0", "TQ1_0", "F64", "I8", "I16", "I32", "I64")
WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "TQ2_0", "TQ1_0")
# llama.cpp's general.file_type for a file whose matrices are all of one type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory. `offset` is absolute (from the start of the file)."""

    name: str
    ne: tuple      # ggml dims, fastest-varying first
    type: str      # ggml type name, e.g. "Q8_0"
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple:
        """NumPy (row-major) shape: ne reversed."""
        return tuple(reversed(self.ne))


# ====================================================================== reading

class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names the byte offset."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str, problem: str, at: int | None = None) -> FormatError:
        return FormatError(f"{self.path}: {what} at byte {self.pos if at is None else at}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(what, f"needs {n} bytes but only {self.size - self.pos} remain (truncated or corrupt file)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def count(self, what: str, min_bytes_each: int) -> int:
        """A u64 element count, refused when the file could not hold that many elements."""
        at = self.pos
        n = self.unpack("<Q", what)
        if n * min_bytes_each > self.size - self.pos:
            raise self.fail(what, f"count {n} cannot fit in the {self.size - self.pos} bytes left", at)
        return n

    def string(self, what: str) -> str:
        return self.strings(1, what, indexed=False)[0]

    def strings(self, n: int, what: str, indexed: bool = True) -> list[str]:
        """n consecutive strings (u64 length + UTF-8), element i named what[i]. One tight
        loop: vocabularies hold hundreds of thousands of them."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        for i in range(n):
            name = f"{what}[{i}]" if indexed else what
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"{name} (string length)")
            length = struct.unpack_from("<Q", buf, pos)[0]
            if length > size - pos - 8:
                raise self.fail(f"{name} (string length)", f"count {length} cannot fit in the {size - pos - 8} bytes left", pos)
            try:
                out.append(buf[pos + 8:pos + 8 + length].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise self.fail(name, f"string is not valid UTF-8 ({e.reason})", pos) from None
            pos += 8 + length
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(what, depth + 1)
        if vtype not in _VALUE_DTYPES:
            raise self.fail(what, f"unknown value type {vtype}")
        v = self.unpack(_STRUCT_FORMATS[vtype], what)
        return bool(v) if vtype == BOOL else v

    def array(self, what: str, depth: int) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(what, f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        at = self.pos
        etype = self.unpack("<I", f"{what} (array element type)")
        if etype not in _MIN_VALUE_BYTES:
            raise self.fail(what, f"unknown array element type {etype}", at)
        n = self.count(f"{what} (array length)", _MIN_VALUE_BYTES[etype])
        if etype == STRING:
            return self.strings(n, what)
        if etype == ARRAY:
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(n)]
        dtype = np.dtype(_VALUE_DTYPES[etype])
        a = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += n * dtype.itemsize
        return a.astype(bool) if etype == BOOL else a.astype(dtype.newbyteorder("="))


class GGUFFile:
    """A GGUF file, memory-mapped: tensors are read from disk only when asked for.

    >>> f = GGUFFile("model.gguf")
    >>> f.metadata["general.architecture"]          # 'llama'
    >>> f.tensors["blk.0.attn_q.weight"]            # ((4096, 4096), 'Q4_K'): NumPy shape, type
    >>> w = f.dequantize("blk.0.attn_q.weight")     # float32 array of that shape

    `metadata` maps keys to Python values (int, float, bool, str; numeric arrays as NumPy
    arrays, string and nested arrays as lists) and `value_types` maps keys to their GGUF
    type name ("uint32", "array[string]", ...); `metadata_offsets` maps keys to the byte
    offset of their entry, for error messages. `tensor_infos` holds the directory.
    """

    def __init__(self, path):
        self.path = Path(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if head[:4] != MAGIC:
                raise FormatError(f"{self.path}: bad magic {head[:4]!r} at byte 0, expected {MAGIC!r} (not a GGUF file)")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        cur = _Cursor(self.path, self._mm, size)
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in VERSIONS:
            hint = ""
            if self.version == 1:
                hint = " (GGUF v1, from 2023, used 32-bit counts: convert it with a current llama.cpp)"
            elif int.from_bytes(self.version.to_bytes(4, "little"), "big") in VERSIONS:
                hint = " (this is a big-endian GGUF file; only little-endian files are supported)"
            raise cur.fail("version", f"unsupported GGUF version {self.version}, expected 2 or 3{hint}", 4)
        n_tensors = cur.count("tensor count", 24)   # a tensor entry takes at least 24 bytes
        n_kv = cur.count("metadata count", 13)      # a key-value takes at least 13 bytes

        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, str] = {}
        self.metadata_offsets: dict[str, int] = {}
        for i in range(n_kv):
            at = cur.pos
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise cur.fail(f"metadata key {key!r}", "duplicate key", at)
            vtype = cur.unpack("<I", f"metadata {key!r} (value type)")
            if vtype not in _MIN_VALUE_BYTES:
                raise cur.fail(f"metadata {key!r}", f"unknown value type {vtype}", cur.pos - 4)
            tname = VALUE_TYPE_NAMES[vtype]
            if vtype == ARRAY:   # peek the element type for value_types
                cur.need(4, f"metadata {key!r}")
                etype = struct.unpack_from("<I", self._mm, cur.pos)[0]
                tname = f"array[{VALUE_TYPE_NAMES[etype] if etype < len(VALUE_TYPE_NAMES) else etype}]"
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")
            self.value_types[key] = tname
            self.metadata_offsets[key] = at

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.value_types["general.alignment"] != "uint32" or a <= 0 or a & (a - 1):
                raise FormatError(f"{self.path}: metadata 'general.alignment' must be a power of two "
                                  f"stored as uint32, got {a!r} ({self.value_types['general.alignment']})")
            self.alignment = a

        entries = []
        for i in range(n_tensors):
            at = cur.pos
            name = cur.string(f"tensor #{i} name")
            what = f"tensor {name!r}"
            n_dims = cur.unpack("<I", f"{what} (n_dims)")
            if n_dims > MAX_DIMS:
                raise cur.fail(what, f"{n_dims} dimensions, at most {MAX_DIMS} allowed", cur.pos - 4)
            cur.need(8 * n_dims, f"{what} (dims)")
            ne = struct.unpack_from(f"<{n_dims}Q", self._mm, cur.pos)
            cur.pos += 8 * n_dims
            tid = cur.unpack("<I", f"{what} (type)")
            if tid not in GGML_TYPES:
                raise cur.fail(what, f"unknown ggml type id {tid}", cur.pos - 4)
            offset = cur.unpack("<Q", f"{what} (offset)")
            entries.append((name, ne, tid, offset, at))

        self.data_offset = _align(cur.pos, self.alignment)
        self.tensor_infos: dict[str, TensorInfo] = {}
        for name, ne, tid, offset, at in entries:
            self.tensor_infos[name] = self._check_tensor(name, ne, tid, offset, at)

    def _check_tensor(self, name: str, ne: tuple, tid: int, offset: int, at: int) -> TensorInfo:
        """Validate one directory entry against the file (Python ints: nothing overflows)."""
        def fail(problem):
            return FormatError(f"{self.path}: tensor {name!r} (entry at byte {at}): {problem}")

        tname, bs, ts = GGML_TYPES[tid]
        if name in self.tensor_infos:
            raise fail("duplicate tensor name")
        if any(d >= 2 ** 63 for d in ne):
            raise fail(f"dimension out of range in ne={list(ne)}")
        n = math.prod(ne)
        if (ne[0] if ne else 1) % bs:
            raise fail(f"row length ne[0]={ne[0] if ne else 1} is not a multiple of {tname}'s block size {bs}")
        nbytes = n // bs * ts
        if offset % self.alignment:
            raise fail(f"data offset {offset} is not a multiple of the alignment {self.alignment}")
        start = self.data_offset + offset
        if start + nbytes > self.size:
            raise fail(f"data [{start}, {start + nbytes}) runs past the end of the file ({self.size} bytes)")
        return TensorInfo(name, tuple(ne), tname, start, nbytes)

    # ------------------------------------------------------------------ access

    @property
    def tensors(self) -> dict[str, tuple[tuple, str]]:
        """name -> (NumPy shape, ggml type name), in file order."""
        return {name: (info.shape, info.type) for name, info in self.tensor_infos.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensor_infos)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensor_infos:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self.tensor_infos[name]

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor: a read-only uint8 view of the mapped file (no copy)."""
        info = self._info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def dequantize(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as float32 in NumPy order (shape = ne reversed): a new array, or written
        into `out` (see the module's dequantize). Its mapped pages are released afterwards."""
        info = self._info(name)
        if info.type not in _DEQUANTIZE and info.type not in _CAST:
            raise FormatError(f"{self.path}: tensor {name!r} has type {info.type}, which nt cannot "
                              f"dequantise (supported: {', '.join(DEQUANTIZE_TYPES)})")
        out = dequantize(self.raw(name), info.type, info.shape, out)
        self.release(name)
        return out

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor whose bytes were copied out from this process's
        resident memory. A loader that copies every tensor otherwise holds the whole file
        (counted in RSS while mapped) beside its copies until close(): for a 232 MB F32 file
        that was the load's peak. The pages stay in the page cache; reading the tensor
        again maps them back in (the mapping is read-only, so nothing is lost)."""
        info = self._info(name)
        if not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or info.nbytes == 0:
            return
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE   # madvise takes page-aligned ranges
        self._mm.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def close(self) -> None:
        """Unmap the file (views returned by raw() must be gone by then)."""
        try:
            self._mm.close()
        except BufferError:
            pass   # views of the mapping are alive; the mapping closes when they go

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensor_infos)} tensors)")


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ====================================================================== quantising

def quantize(x: np.ndarray, type: str) -> np.ndarray:
    """Encode float values as ggml `type` (one of WRITE_TYPES) along the last axis.

    Returns uint8 of shape (*x.shape[:-1], bytes per row); Q8_0, Q4_0, TQ2_0 and TQ1_0 round
    exactly as ggml's reference quantisers, F16 and BF16 round to nearest even. TQ2_0 and
    TQ1_0 (ternary: d = max|x| per 256-block, codes round(x / d) in {-1, 0, 1}) are exact for
    ternary-valued blocks, e.g. a BitNet weight's codes times its scale; anything else loses precision."""
    if type not in WRITE_TYPES:
        raise ValueError(f"nt writes {', '.join(WRITE_TYPES)}; got type {type!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    _, bs, ts = GGML_TYPES[GGML_TYPE_IDS[type]]
    row = x.shape[-1] if x.ndim else 1
    if row % bs:
        raise ValueError(f"{type} quantises blocks of {bs} along the last axis; shape {x.shape} does not divide")
    flat = x.reshape(-1)
    if type == "F32":
        raw = flat.astype("<f4").view(np.uint8)
    elif type == "F16":
        raw = flat.astype("<f2").view(np.uint8)
    elif type == "BF16":
        bits = np.empty(flat.size, dtype=np.uint16)
        quant.quantize_bf16(bits, flat.view(np.uint32))
        raw = bits.astype("<u2").view(np.uint8)
    elif type in ("TQ2_0", "TQ1_0"):
        blocks = flat.reshape(-1, bs)
        d = np.abs(blocks).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        scaled = blocks * inv
        codes = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)  # half away from 0
        raw = np.empty(flat.size // bs * ts, dtype=np.uint8)
        (bitnet.pack_tq2_0 if type == "TQ2_0" else bitnet.pack_tq1_0)(
            raw, codes.reshape(-1), d.reshape(-1).astype("<f2").view(np.uint16))
    else:
        nb = flat.size // bs
        raw = np.zeros(nb * ts, dtype=np.uint8)
        d = np.empty(nb, dtype=np.float32)
        (quant.quantize_q8_0 if type == "Q8_0" else quant.quantize_q4_0)(raw, d, flat)
        raw.reshape(nb, ts)[:, :2] = d.astype("<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(*x.shape[:-1], row // bs * ts)


def dequantize(raw: np.ndarray, type: str, shape: tuple, out: np.ndarray | None = None) -> np.ndarray:
    """Decode ggml `type` bytes (as stored in a file) into a float32 array of `shape`: a new
    one, or `out` (C-contiguous float32 of that shape, e.g. a model's parameter slice, so a
    loader makes no temporary copy of each tensor)."""
    if type not in _DEQUANTIZE and type not in _CAST:
        raise ValueError(f"cannot dequantise type {type!r}; supported: {', '.join(DEQUANTIZE_TYPES)}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    _, bs, ts = GGML_TYPES[GGML_TYPE_IDS[type]]
    n = math.prod(shape)
    if n % bs or raw.size != n // bs * ts:
        raise ValueError(f"{raw.size} bytes of {type} do not hold a tensor of shape {tuple(shape)}")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != tuple(shape) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {tuple(shape)}, got {out.dtype} {out.shape}")
    if type in _CAST:
        out[...] = np.frombuffer(raw, dtype=_CAST[type]).reshape(shape)
    else:
        flat = out.reshape(-1)
        _DEQUANTIZE[type](flat.view(np.uint32) if type == "BF16" else flat, raw, quant.F16_TABLE)
    return out


def quantized_matmul(x: np.ndarray, w: np.ndarray, type: str) -> np.ndarray:
    """x (N, C) float32 @ W^T for W (OC, C) stored as Q8_0 or Q4_0 rows `w` (OC, C/32 * block
    bytes), as quantize(W, type) returns: blocks are decoded inside the kernel, one at a time."""
    kernels = {"Q8_0": quant.matmul_q8_0, "Q4_0": quant.matmul_q4_0}
    if type not in kernels:
        raise ValueError(f"quantized_matmul supports Q8_0 and Q4_0, got {type!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    _, bs, ts = GGML_TYPES[GGML_TYPE_IDS[type]]
    if x.ndim != 2 or x.shape[1] % bs:
        raise ValueError(f"x must be (N, C) with C a multiple of {bs}, got shape {x.shape}")
    if w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != x.shape[1] // bs * ts:
        raise ValueError(f"w must be uint8 (OC, {x.shape[1] // bs * ts}) {type} rows for C={x.shape[1]}, "
                         f"got {w.dtype} {w.shape}")
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    scratch = np.empty((numba.config.NUMBA_NUM_THREADS, quant.QK), dtype=np.float32)  # lanes per thread
    kernels[type](out, x, np.ascontiguousarray(w), quant.F16_TABLE, scratch)
    return out


# ====================================================================== writing

_DTYPE_VALUE_TYPES = {np.dtype(d).newbyteorder("<"): t for t, d in _VALUE_DTYPES.items() if t != BOOL}


def _encode_value(key: str, v: Any) -> tuple[int, bytes]:
    """(GGUF value type, encoded bytes). Python ints become uint32 (negative ones int32) when
    they fit, else uint64 (int64); floats float32; lists arrays (ints int32 or int64, floats
    float32); NumPy scalars and arrays keep their type: use them to choose one."""
    if isinstance(v, (bool, np.bool_)):
        return BOOL, struct.pack("<B", bool(v))
    if isinstance(v, np.generic):
        t = _DTYPE_VALUE_TYPES.get(v.dtype.newbyteorder("<"))
        if t is None:
            raise ValueError(f"metadata {key!r}: NumPy type {v.dtype} has no GGUF equivalent")
        return t, np.asarray(v, dtype=_VALUE_DTYPES[t]).tobytes()
    if isinstance(v, int):
        for t, lo, hi in ((UINT32, 0, 2 ** 32), (INT32, -2 ** 31, 0), (UINT64, 0, 2 ** 64), (INT64, -2 ** 63, 0)):
            if lo <= v < hi:
                return t, struct.pack(_STRUCT_FORMATS[t], v)
        raise ValueError(f"metadata {key!r}: integer {v} does not fit in 64 bits")
    if isinstance(v, float):
        return FLOAT32, struct.pack("<f", v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return STRING, struct.pack("<Q", len(b)) + b
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise ValueError(f"metadata {key!r}: arrays must be 1-D, got shape {v.shape}")
        if v.dtype == np.bool_:
            et = BOOL
        else:
            et = _DTYPE_VALUE_TYPES.get(v.dtype.newbyteorder("<"))
            if et is None:
                raise ValueError(f"metadata {key!r}: NumPy type {v.dtype} has no GGUF equivalent")
        return ARRAY, struct.pack("<IQ", et, v.size) + v.astype(_VALUE_DTYPES[et]).tobytes()
    if isinstance(v, (list, tuple)):
        if all(isinstance(e, str) for e in v):
            et = STRING
        elif all(isinstance(e, (list, tuple, np.ndarray)) for e in v) and v:
            et = ARRAY
        elif all(isinstance(e, (bool, np.bool_)) for e in v) and v:
            et = BOOL
        elif all(isinstance(e, (int, np.integer)) and not isinstance(e, (bool, np.bool_)) for e in v):
            et = INT32 if all(-2 ** 31 <= e < 2 ** 31 for e in v) else INT64
        elif all(isinstance(e, (int, float, np.integer, np.floating)) for e in v):
            et = FLOAT32
        else:
            raise ValueError(f"metadata {key!r}: list elements must all be strings, bools, numbers or lists")
        if et in (STRING, ARRAY):
            body = b"".join(_encode_value(key, e)[1] for e in v)
        else:
            body = np.asarray(v, dtype=_VALUE_DTYPES[et]).tobytes()
        return ARRAY, struct.pack("<IQ", et, len(v)) + body
    raise ValueError(f"metadata {key!r}: cannot store a {type(v).__name__} in GGUF")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_gguf(path, metadata: dict, tensors: dict, alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF v3 file atomically (temporary file, fsync, rename).

    metadata: key -> value (see _encode_value for the types chosen; pass NumPy scalars or
    arrays to pick one). tensors: name -> (array, type) with type in WRITE_TYPES; arrays
    are in NumPy order (the last axis becomes ne[0] and is the axis blocks run along).
    Tensors are quantised one at a time while writing: peak memory is one tensor."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in metadata:
        if int(metadata.setdefault("general.alignment", np.uint32(alignment))) != alignment:
            raise ValueError(f"metadata general.alignment={metadata['general.alignment']} contradicts alignment={alignment}")
        metadata["general.alignment"] = np.uint32(alignment)

    head = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, v in metadata.items():
        t, body = _encode_value(key, v)
        head += [_string(key), struct.pack("<I", t), body]

    plan, offset = [], 0
    for name, (arr, ttype) in tensors.items():
        arr = np.asarray(arr)
        if ttype not in WRITE_TYPES:
            raise ValueError(f"tensor {name!r}: nt writes {', '.join(WRITE_TYPES)}, got {ttype!r}")
        if arr.ndim > MAX_DIMS or arr.dtype.kind not in "iuf":
            raise ValueError(f"tensor {name!r}: need a real array of at most {MAX_DIMS} dims, got {arr.dtype} {arr.shape}")
        _, bs, ts = GGML_TYPES[GGML_TYPE_IDS[ttype]]
        if (arr.shape[-1] if arr.ndim else 1) % bs:
            raise ValueError(f"tensor {name!r}: {ttype} needs the last axis to be a multiple of {bs}, got shape {arr.shape}")
        nbytes = arr.size // bs * ts
        head += [_string(name), struct.pack(f"<I{arr.ndim}QIQ", arr.ndim, *reversed(arr.shape),
                                            GGML_TYPE_IDS[ttype], offset)]
        plan.append((arr, ttype, nbytes))
        offset = _align(offset + nbytes, alignment)
    head = b"".join(head)

    def chunks():
        yield np.frombuffer(head + bytes(_align(len(head), alignment) - len(head)), dtype=np.uint8)
        for arr, ttype, nbytes in plan:
            yield quantize(arr, ttype).reshape(-1)
            yield np.zeros(_align(nbytes, alignment) - nbytes, dtype=np.uint8)

    atomic_write(path, chunks())
