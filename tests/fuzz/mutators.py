"""Mutators: turn the bytes of a valid file into a hostile one, deterministically.

Every mutator takes a NumPy Generator and returns the new bytes plus a short description
(which goes into failure reports, so a human can see what was done). Three families:

* byte mutators: bit flips, overwrites with "interesting" integers, truncation,
  extension, duplicated or deleted chunks -- format-blind, they find framing bugs;
* field mutators: the same interesting integers written over a known header field
  (the format tells where its fields are), so the mutation reaches the code that trusts
  that field instead of dying at the first checksum-like check;
* JSON mutators: parse the document, change its structure (wrong types, deep nesting,
  duplicate keys, huge numbers, NaN literals, removed or added keys), and serialise it
  again with our own emitter, so the result is still JSON unless we meant otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# Integers that historically break parsers: zero, one, sign boundaries, all-ones, powers
# of two near the 16/32/64-bit limits. Written little-endian, signed ones as two's complement.
INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 64, 127, 128, 255, 256, 1023, 4096, 65535, 65536,
               2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63,
               2 ** 64 - 1, -1, -2, -128, -2 ** 31, -2 ** 63]
WIDTHS = (1, 2, 4, 8)


def pick(rng: np.random.Generator, seq):
    """One element of a sequence, chosen by `rng` (np.random's choice dislikes mixed lists)."""
    return seq[int(rng.integers(len(seq)))]


def encode_int(value: int, width: int) -> bytes:
    """`value` as `width` little-endian bytes, wrapped to that width (so -1 is all ones)."""
    return (value % (1 << (8 * width))).to_bytes(width, "little")


def interesting_int(rng: np.random.Generator, near: int | None = None) -> int:
    """An interesting integer; with `near`, sometimes a value just off the real one."""
    if near is not None and rng.random() < 0.4:
        # off by one or two, doubled, negated, or pushed past 2**20 / 2**31 / 2**40
        return near + pick(rng, [-1, 1, -2, 2, near, -2 * near, 1 << 20, 1 << 31, 1 << 40])
    return pick(rng, INTERESTING)


# ====================================================================== byte mutators

def bit_flip(rng, data: bytes) -> tuple[bytes, str]:
    if not data:
        return b"\x00", "bit_flip on empty file -> one zero byte"
    buf = bytearray(data)
    n = int(rng.integers(1, 9))
    where = sorted(int(rng.integers(len(buf) * 8)) for _ in range(n))
    for bit in where:
        buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf), f"bit_flip bits {where}"


def overwrite_int(rng, data: bytes, offset: int | None = None, width: int | None = None,
                  near: int | None = None) -> tuple[bytes, str]:
    """Write an interesting integer at `offset` (random when None) as `width` bytes."""
    width = width or pick(rng, WIDTHS)
    if len(data) < width:
        return data + encode_int(-1, width), f"overwrite: file shorter than {width} bytes, appended all-ones"
    if offset is None:
        offset = int(rng.integers(len(data) - width + 1))
    offset = min(offset, len(data) - width)
    value = interesting_int(rng, near)
    buf = bytearray(data)
    buf[offset:offset + width] = encode_int(value, width)
    return bytes(buf), f"overwrite u{8 * width} at byte {offset} with {value}"


def overwrite_bytes(rng, data: bytes) -> tuple[bytes, str]:
    """A run of one byte value (0x00, 0xFF, 0x80, ...) or random bytes over a random span."""
    if not data:
        return b"\xff" * 8, "overwrite_bytes on empty file -> 8 x 0xFF"
    start = int(rng.integers(len(data)))
    n = int(min(len(data) - start, pick(rng, [1, 2, 4, 8, 16, 64, 512])))
    fill = pick(rng, [0x00, 0xFF, 0x7F, 0x80, None])
    chunk = rng.integers(0, 256, n, dtype=np.uint8).tobytes() if fill is None else bytes([fill]) * n
    label = "random" if fill is None else f"0x{fill:02X}"
    return data[:start] + chunk + data[start + n:], f"overwrite {n} bytes at {start} with {label}"


def truncate(rng, data: bytes) -> tuple[bytes, str]:
    """Cut the file short: to 0, to a few bytes, to a random length, or one byte short."""
    n = pick(rng, [0, 1, 4, 7, 8, 16, None, None, max(len(data) - 1, 0)])
    if n is None:
        n = int(rng.integers(len(data) + 1))
    n = min(n, len(data))
    return data[:n], f"truncate to {n} of {len(data)} bytes"


def extend(rng, data: bytes) -> tuple[bytes, str]:
    """Append zeros, 0xFF, random bytes or a copy of the file's own start."""
    n = pick(rng, [1, 3, 4, 8, 32, 1024, 65536])
    kind = pick(rng, ["zeros", "ones", "random", "self"])
    tail = {"zeros": bytes(n), "ones": b"\xff" * n, "self": data[:n],
            "random": rng.integers(0, 256, n, dtype=np.uint8).tobytes()}[kind]
    return data + tail, f"extend by {len(tail)} bytes ({kind})"


def duplicate_chunk(rng, data: bytes) -> tuple[bytes, str]:
    """Copy a slice of the file and insert it elsewhere (repeated records, shifted framing)."""
    if not data:
        return data, "duplicate_chunk on empty file (no-op)"
    a = int(rng.integers(len(data)))
    n = int(min(len(data) - a, pick(rng, [1, 4, 8, 16, 64, 256, 4096])))
    at = int(rng.integers(len(data) + 1))
    return data[:at] + data[a:a + n] + data[at:], f"duplicate {n} bytes from {a} at {at}"


def delete_chunk(rng, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "delete_chunk on empty file (no-op)"
    a = int(rng.integers(len(data)))
    n = int(min(len(data) - a, pick(rng, [1, 4, 8, 16, 64, 256, 4096])))
    return data[:a] + data[a + n:], f"delete {n} bytes at {a}"


BYTE_MUTATORS: list[Callable] = [bit_flip, overwrite_int, overwrite_bytes, truncate, extend,
                                 duplicate_chunk, delete_chunk]


def byte_mutation(rng, data: bytes) -> tuple[bytes, str]:
    """One format-blind mutation, chosen at random."""
    return pick(rng, BYTE_MUTATORS)(rng, data)


@dataclass(frozen=True)
class Field:
    """A header field of a seed file: where it is, how wide, what it holds (for reports)."""
    name: str
    offset: int
    width: int
    value: int | None = None


def field_mutation(rng, data: bytes, fields: list[Field]) -> tuple[bytes, str]:
    """An interesting integer (or one just off the real value) written over a known field."""
    f = pick(rng, fields)
    out, what = overwrite_int(rng, data, f.offset, f.width, near=f.value)
    return out, f"field {f.name}: {what}"


# ====================================================================== JSON

class Raw:
    """JSON text emitted verbatim: literals Python's json refuses to write (NaN, 1e999,
    deep nesting, lone surrogates) and duplicate keys (see DupDict)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"Raw({self.text[:40]!r})"


class DupDict:
    """An object whose key list may repeat a key (a dict cannot)."""

    def __init__(self, items: list):
        self.items = items


def dumps(obj: Any) -> str:
    """Serialise a tree of JSON values, Raw and DupDict. Recursive, but the trees we build
    are shallow: deep nesting is always a Raw string, never a deep tree."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, DupDict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in obj.items) + "}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def _odd_values() -> list:
    """Values of the wrong type or absurd size, for a slot that expects something sane."""
    return [None, True, False, 0, -1, 1.5, -0.0, "", "x", "0", [], {}, [1, 2], {"a": 1},
            2 ** 31 - 1, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, 1e308, 2.5e-324,
            Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"),
            Raw("1" + "0" * 5000), Raw('"\\ud800"'), Raw('"\\u0000"'), "x" * 100000,
            Raw("[" * 5000 + "]" * 5000), Raw('{"a":' * 3000 + "1" + "}" * 3000)]


def _paths(obj, prefix=(), out=None, limit=5000) -> list:
    """Every (path to a node) in a JSON tree, breadth-limited so a 50k-entry vocabulary does
    not make each mutation slow (the first entries of a big container stand for the rest)."""
    out = [] if out is None else out
    out.append(prefix)
    if len(out) > limit:
        return out
    if isinstance(obj, (dict, list)):
        keys = list(obj) if isinstance(obj, dict) else range(len(obj))
        for i, k in enumerate(keys):
            if i < 64 or i % 97 == 0:   # the first 64 entries, then every 97th
                _paths(obj[k], prefix + (k,), out, limit)
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def json_mutation(rng, data: bytes) -> tuple[bytes, str]:
    """One structural mutation of a JSON document (or a byte mutation when it does not
    parse, or nests too deeply for Python's recursive json module: an earlier mutation)."""
    try:
        doc = json.loads(data.decode("utf-8"))
        return _json_structural(rng, doc)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return byte_mutation(rng, data)


def _json_structural(rng, doc) -> tuple[bytes, str]:
    kind = pick(rng, ["wrong_type", "wrong_type", "number", "remove", "add", "duplicate_key",
                      "deep", "non_utf8", "truncate_text", "swap_container"])
    paths = _paths(doc)
    path = pick(rng, paths)
    node = _get(doc, path)
    where = "/" + "/".join(map(str, path))

    if kind == "wrong_type":
        value = pick(rng, _odd_values())
        doc = _set(doc, path, value)
        return dumps(doc).encode("utf-8"), f"json {where} := {value!r:.60}"
    if kind == "number":
        nums = [p for p in paths if isinstance(_get(doc, p), (int, float)) and not isinstance(_get(doc, p), bool)]
        if nums:
            path = pick(rng, nums)
            where = "/" + "/".join(map(str, path))
            old = _get(doc, path)
            new = pick(rng, [0, -1, -old, old + 1, old - 1, old * 1024, 2 ** 31, 2 ** 63, 10 ** 20,
                             float(old) + 0.5, Raw("1e999"), Raw("NaN"), Raw("-0")])
            doc = _set(doc, path, new)
            return dumps(doc).encode("utf-8"), f"json number {where}: {old!r} -> {new!r}"
    if kind == "remove" and path:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return dumps(doc).encode("utf-8"), f"json remove {where}"
    if kind == "add":
        containers = [p for p in paths if isinstance(_get(doc, p), (dict, list))]
        if containers:
            path = pick(rng, containers)
            where = "/" + "/".join(map(str, path))
            target = _get(doc, path)
            value = pick(rng, _odd_values())
            if isinstance(target, dict):
                key = pick(rng, ["__metadata__", "", "extra", "__tensor__", "x" * 300, "\u2581", "0"])
                target[key] = value
                return dumps(doc).encode("utf-8"), f"json add key {key!r:.20} = {value!r:.40} at {where}"
            target.append(value)
            return dumps(doc).encode("utf-8"), f"json append {value!r:.40} at {where}"
    if kind == "duplicate_key":
        objects = [p for p in paths if isinstance(_get(doc, p), dict) and _get(doc, p)]
        if objects:
            path = pick(rng, objects)
            target = _get(doc, path)
            key = pick(rng, list(target))
            items = list(target.items()) + [(key, pick(rng, _odd_values()[:12] + [target[key]]))]
            doc = _set(doc, path, DupDict(items))
            return dumps(doc).encode("utf-8"), f"json duplicate key {key!r:.40} at /{'/'.join(map(str, path))}"
    if kind == "deep":
        depth = pick(rng, [65, 1000, 100000])
        value = Raw("[" * depth + "]" * depth) if rng.random() < 0.5 else Raw('{"a":' * depth + "0" + "}" * depth)
        doc = _set(doc, path, value)
        return dumps(doc).encode("utf-8"), f"json {where} := nesting depth {depth}"
    if kind == "non_utf8":
        text = dumps(doc).encode("utf-8")
        at = int(rng.integers(len(text) + 1))
        bad = pick(rng, [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])
        return text[:at] + bad + text[at:], f"json insert non-UTF-8 {bad!r} at byte {at}"
    if kind == "truncate_text":
        text = dumps(doc).encode("utf-8")
        n = int(rng.integers(len(text) + 1))
        return text[:n], f"json truncate to {n} of {len(text)} bytes"
    if kind == "swap_container":
        value = list(node.values()) if isinstance(node, dict) else {str(i): v for i, v in enumerate(node)} \
            if isinstance(node, list) else [node]
        doc = _set(doc, path, value)
        return dumps(doc).encode("utf-8"), f"json {where}: container type swapped"
    # the chosen kind did not apply to this document: fall back to a wrong-typed value
    value = pick(rng, _odd_values())
    return dumps(_set(doc, path, value)).encode("utf-8"), f"json {where} := {value!r:.60}"


def stacked(rng, data: bytes, choices: list[Callable]) -> tuple[bytes, list[str]]:
    """1-3 mutations in a row (mostly one): a second fault often hides behind the first check."""
    n = 1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)
    notes = []
    for _ in range(n):
        data, note = pick(rng, choices)(rng, data)
        notes.append(note)
    return data, notes
