"""A small GGUF parser and writer of our own, for structure-aware mutation.

Byte mutators mostly die at the first length check. To reach the code that builds a
model from metadata, the fuzzer needs files whose framing is intact but whose *content*
is wrong: a block count stored as a string, a head count of zero, a tensor whose dims
disagree with the metadata, a Q8_0 block whose scale is NaN. So seeds are parsed into a
`Doc`, mutated as a structure, and serialised again with correct lengths and padding.

The parser only has to understand the valid seeds nt itself writes; it also records
where every header field lives (`Doc.fields`) for the field-offset byte mutator.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from .mutators import Field, interesting_int, pick

# GGUF metadata value types (the spec's numbering)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
          U64: "<Q", I64: "<q", F64: "<d"}
# ggml tensor type ids -> (elements per block, bytes per block), the ones mutations use
BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 12: (256, 144), 14: (256, 210),
          26: (1, 4), 30: (1, 2)}
MAX_PAD = 1 << 16


@dataclass
class Array:
    """A metadata array: element type and items (Python values, or Arrays when nested)."""
    etype: int
    items: list


@dataclass
class Doc:
    version: int
    kvs: list        # [key, vtype, value]; strings may be bytes (to carry invalid UTF-8)
    tensors: list    # [name, ne (list, fastest first), type id, offset]
    data: bytes      # everything after the padded header
    fields: list = field(default_factory=list)

    @property
    def alignment(self) -> int:
        for key, vtype, value in self.kvs:
            if key == "general.alignment" and vtype == U32 and value > 0 and not value & (value - 1):
                return value
        return 32


# ====================================================================== parse

class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.fields = buf, 0, []

    def take(self, fmt: str, name: str | None = None):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        if name is not None and fmt[-1] in "BbHhIiQq":
            self.fields.append(Field(name, self.pos, struct.calcsize(fmt), v))
        self.pos += struct.calcsize(fmt)
        return v

    def string(self, name: str) -> str:
        n = self.take("<Q", f"{name} length")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int, name: str):
        if vtype == STRING:
            return self.string(name)
        if vtype == ARRAY:
            etype = self.take("<I", f"{name} element type")
            n = self.take("<Q", f"{name} array length")
            # only the first element of an array is a field worth recording
            return Array(etype, [self.value(etype, name if i == 0 else None) for i in range(n)])
        return self.take(SCALAR[vtype], name)


def parse(buf: bytes) -> Doc:
    """A valid GGUF file (as nt writes them) as a Doc."""
    r = _Reader(buf)
    assert buf[:4] == b"GGUF", "seed is not GGUF"
    r.pos = 4
    version = r.take("<I", "version")
    n_tensors = r.take("<Q", "tensor count")
    n_kv = r.take("<Q", "metadata count")
    kvs = []
    for _ in range(n_kv):
        key = r.string("key")
        vtype = r.take("<I", f"{key} value type")
        kvs.append([key, vtype, r.value(vtype, key)])
    tensors = []
    for _ in range(n_tensors):
        name = r.string("tensor name")
        n_dims = r.take("<I", f"{name} n_dims")
        ne = [r.take("<Q", f"{name} ne[{i}]") for i in range(n_dims)]
        tid = r.take("<I", f"{name} type")
        offset = r.take("<Q", f"{name} offset")
        tensors.append([name, ne, tid, offset])
    doc = Doc(version, kvs, tensors, b"", r.fields)
    start = (r.pos + doc.alignment - 1) // doc.alignment * doc.alignment
    doc.data = buf[start:]
    return doc


# ====================================================================== write

def _string(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, v) -> bytes:
    if vtype == STRING:
        return _string(v)
    if vtype == ARRAY:
        return struct.pack("<IQ", v.etype, len(v.items)) + b"".join(_value(v.etype, e) for e in v.items)
    fmt = SCALAR[vtype]
    if fmt[-1] in "fd":
        return struct.pack(fmt, float(v))
    return (int(v) % (1 << (8 * struct.calcsize(fmt)))).to_bytes(struct.calcsize(fmt), "little")


def serialise(doc: Doc) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", doc.version, len(doc.tensors), len(doc.kvs))]
    for key, vtype, value in doc.kvs:
        out += [_string(key), struct.pack("<I", vtype), _value(vtype, value)]
    for name, ne, tid, offset in doc.tensors:
        out += [_string(name), struct.pack("<I", len(ne)),
                b"".join((int(d) % 2 ** 64).to_bytes(8, "little") for d in ne),
                struct.pack("<I", tid), (int(offset) % 2 ** 64).to_bytes(8, "little")]
    head = b"".join(out)
    # a mutated alignment may be 2**31: padding to it would write gigabytes, so past
    # 64 KiB pad as the seed did (the file then disagrees with its own alignment key)
    a = doc.alignment if doc.alignment <= MAX_PAD else 32
    return head + bytes(-len(head) % a) + doc.data


# ====================================================================== structural mutations

def _odd_value(rng, vtype: int, value):
    """(vtype, value) that is wrong for a slot holding `value` of `vtype`."""
    choices = [(STRING, "2"), (STRING, b"\xff\xfe"), (F32, 2.5), (F32, float("nan")), (F64, float("inf")),
               (BOOL, 1), (I32, -1), (I64, -2 ** 63), (U64, 2 ** 63), (U64, 2 ** 64 - 1), (U32, 0),
               (U32, 2 ** 32 - 1), (ARRAY, Array(U32, [2, 2])), (ARRAY, Array(STRING, [])),
               (ARRAY, Array(ARRAY, [Array(I8, [1])]))]
    if vtype not in (STRING, ARRAY):   # a numeric slot: also the same type, a value just off
        choices += [(vtype, interesting_int(rng, int(value) if not isinstance(value, float) else 1))] * 4
        if vtype in (F32, F64):
            choices += [(vtype, x) for x in (0.0, -1.0, 1e30, float("nan"), float("inf"), 5e-324)]
    return pick(rng, choices)


# keys a file might add that change how nt reads it
EXTRA_KEYS = [
    ("general.alignment", U32, 0), ("general.alignment", U32, 3), ("general.alignment", U32, 2 ** 31),
    ("general.alignment", U64, 64), ("general.alignment", STRING, "32"), ("general.alignment", U32, 1),
    ("general.architecture", STRING, "mamba"), ("general.architecture", U32, 1),
    ("llama.attention.head_count_kv", U32, 0), ("llama.attention.head_count_kv", U32, 3),
    ("llama.attention.key_length", U32, 7), ("llama.rope.freq_base", F32, -1.0),
    ("llama.rope.freq_base", F32, float("nan")), ("llama.rope.scaling.type", STRING, "yarn"),
    ("llama.rope.scaling.factor", U32, 4), ("llama.attention.layer_norm_rms_epsilon", F32, float("nan")),
    ("gpt2.feed_forward_length", STRING, "256"), ("gpt2.attention.head_count", U32, 0),
    ("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.model", STRING, "llama"),
    ("tokenizer.ggml.model", U32, 7), ("tokenizer.ggml.tokens", ARRAY, Array(U32, [1, 2, 3])),
    ("tokenizer.ggml.tokens", ARRAY, Array(STRING, ["a", "a", "b"])),
    ("tokenizer.ggml.tokens", STRING, "abc"), ("tokenizer.ggml.merges", ARRAY, Array(STRING, ["a b c", "zz q"])),
    ("tokenizer.ggml.token_type", ARRAY, Array(I32, [1])), ("tokenizer.ggml.scores", ARRAY, Array(F32, [float("nan")])),
    ("tokenizer.ggml.bos_token_id", U32, 2 ** 32 - 1), ("tokenizer.ggml.bos_token_id", I32, -1),
    ("tokenizer.ggml.eos_token_id", STRING, "1"), ("tokenizer.ggml.unknown_token_id", U32, 10 ** 9),
    ("tokenizer.ggml.add_bos_token", STRING, "yes"), ("tokenizer.ggml.pre", STRING, "\x00"),
    ("tokenizer.chat_template", ARRAY, Array(STRING, ["{{"])),
]


def _tensor_bytes(ne, tid) -> int:
    bs, ts = BLOCKS.get(tid, (1, 4))
    return int(np.prod(ne, dtype=object)) // bs * ts


def mutate_doc(rng, doc: Doc) -> str:
    """Change `doc` in place in one structural way; returns the description."""
    kind = pick(rng, ["kv_value", "kv_value", "kv_value", "kv_remove", "kv_duplicate", "kv_add", "kv_add",
                      "ne", "ne", "n_dims", "ttype", "offset", "t_rename", "t_remove", "t_duplicate",
                      "poison_data", "poison_data", "version", "tokens"])
    if kind == "kv_value" and doc.kvs:
        kv = pick(rng, doc.kvs)
        old = (kv[1], kv[2])
        kv[1], kv[2] = _odd_value(rng, kv[1], kv[2])
        return f"gguf metadata {kv[0]!r}: {old[1]!r:.40} (type {old[0]}) -> {kv[2]!r:.40} (type {kv[1]})"
    if kind == "kv_remove" and doc.kvs:
        kv = doc.kvs.pop(int(rng.integers(len(doc.kvs))))
        return f"gguf remove metadata {kv[0]!r}"
    if kind == "kv_duplicate" and doc.kvs:
        kv = pick(rng, doc.kvs)
        doc.kvs.append(list(kv))
        return f"gguf duplicate metadata {kv[0]!r}"
    if kind == "kv_add":
        key, vtype, value = pick(rng, EXTRA_KEYS)
        doc.kvs = [kv for kv in doc.kvs if kv[0] != key] + [[key, vtype, value]]
        return f"gguf set metadata {key!r} = {value!r:.40} (type {vtype})"
    if kind == "tokens":
        toks = [kv for kv in doc.kvs if kv[0].startswith("tokenizer.ggml.") and kv[1] == ARRAY and kv[2].items]
        if toks:
            kv = pick(rng, toks)
            items = kv[2].items
            how = pick(rng, ["drop_last", "dup_first", "empty", "bad_utf8", "huge_int"])
            if how == "drop_last":
                items.pop()
            elif how == "dup_first":
                items.append(items[0])
            elif how == "empty":
                items.clear()
            elif how == "bad_utf8" and kv[2].etype == STRING:
                items[int(rng.integers(len(items)))] = b"\xc3("
            elif kv[2].etype != STRING:
                items[int(rng.integers(len(items)))] = interesting_int(rng) if kv[2].etype not in (F32, F64) else float("nan")
            return f"gguf metadata {kv[0]!r} array: {how}"
    if not doc.tensors:
        return mutate_doc(rng, doc) if doc.kvs else "gguf (nothing left to mutate)"
    t = pick(rng, doc.tensors)
    if kind == "ne" and t[1]:
        i = int(rng.integers(len(t[1])))
        old = t[1][i]
        t[1][i] = pick(rng, [0, 1, old + 1, old - 1, old * 2, old // 2, 32, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64 - 1])
        return f"gguf tensor {t[0]!r} ne[{i}]: {old} -> {t[1][i]}"
    if kind == "ne" and len(t[1]) >= 2:
        t[1].reverse()
        return f"gguf tensor {t[0]!r} dims reversed"
    if kind == "n_dims":
        old = list(t[1])
        t[1] = pick(rng, [t[1] + [1], t[1][:-1], [], [1] * 5, t[1] + [2]])
        return f"gguf tensor {t[0]!r} ne {old} -> {t[1]}"
    if kind == "ttype":
        old = t[2]
        t[2] = pick(rng, [0, 1, 2, 8, 12, 14, 26, 30, 4, 99, 2 ** 32 - 1])
        return f"gguf tensor {t[0]!r} type {old} -> {t[2]}"
    if kind == "offset":
        old = t[3]
        t[3] = pick(rng, [0, old + 1, old + doc.alignment, max(old - doc.alignment, 0), len(doc.data),
                          2 ** 63, 2 ** 64 - doc.alignment])
        return f"gguf tensor {t[0]!r} offset {old} -> {t[3]}"
    if kind == "t_rename":
        old = t[0]
        t[0] = pick(rng, [doc.tensors[0][0], "", old + ".x", "blk.99.attn_q.weight", "rope_freqs.weight", "output.weight"])
        return f"gguf rename tensor {old!r} -> {t[0]!r}"
    if kind == "t_remove":
        doc.tensors.remove(t)
        return f"gguf remove tensor {t[0]!r}"
    if kind == "t_duplicate":
        doc.tensors.append(list(t[:1]) + [list(t[1])] + list(t[2:]))
        return f"gguf duplicate tensor entry {t[0]!r}"
    if kind == "poison_data":
        # NaN/Inf in an F32 tensor, or a non-finite f16 scale at the head of a Q8_0/Q4_0 block
        start, nbytes = t[3], _tensor_bytes(t[1], t[2])
        if t[2] == 0 and nbytes >= 4:
            at = start + 4 * int(rng.integers(nbytes // 4))
            val = pick(rng, [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\xff\xff\x7f\x7f"])
        else:
            bs, ts = BLOCKS.get(t[2], (32, 34))
            at = start + ts * int(rng.integers(max(nbytes // ts, 1)))
            val = pick(rng, [b"\x00\x7c", b"\x00\x7e", b"\x00\xfc", b"\xff\x7b"])
        if at + len(val) <= len(doc.data):
            doc.data = doc.data[:at] + val + doc.data[at + len(val):]
        return f"gguf poison tensor {t[0]!r} (type {t[2]}) at data byte {at} with {val.hex()}"
    if kind == "version":
        old = doc.version
        doc.version = pick(rng, [1, 2, 4, 0x03000000, 2 ** 32 - 1])
        return f"gguf version {old} -> {doc.version}"
    return mutate_doc(rng, doc)   # the chosen kind had nothing to act on here: draw again
