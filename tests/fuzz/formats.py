"""The six file formats nt reads: valid seeds, how to mutate them, how to load and check them.

Each format is a `Format`:

* `seeds()` writes small VALID files with nt's own writers and returns them as `Seed`s
  (file name -> bytes, plus the parameters the loader needs, e.g. the vocabulary size);
* `mutate(rng, seed, seeds)` returns the files of one hostile case and notes saying what
  was done (a file may map to None: deleted, or to DIRECTORY: replaced by a folder);
* `exercise(folder, params)` runs in the worker: the user-level entry point on the case,
  then checks of what it returned (finite weights, tokens in range, ...). A check that
  fails raises `Invalid`; a loader that refuses the file raises whatever it raises.

Seeds are deterministic (fixed model seeds, fixed text), so a case is reproduced from
(format, case seed) alone.
"""
from __future__ import annotations

import importlib
import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import gguf_struct
from .mutators import DupDict, Field, byte_mutation, dumps, field_mutation, json_mutation, pick

DIRECTORY = "<directory>"   # a case file that is replaced by an (empty) folder

# A weight this large (finite) may legitimately overflow a forward pass to inf/NaN, so
# non-finite logits only count against the loader when every weight is finite and below it.
SANE_WEIGHT = 1e3


class Invalid(Exception):
    """A loader accepted a file but what it returned breaks the format's promises."""


@dataclass
class Seed:
    name: str
    files: dict                    # relative path -> bytes
    params: dict = field(default_factory=dict)


@dataclass
class Format:
    name: str
    seeds: Callable[[], list]
    mutate: Callable               # (rng, seed, all seeds) -> (files, notes)
    exercise: Callable             # (folder Path, params) -> None, in the worker


# ====================================================================== shared helpers

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "Numbers 12345 and 2024-11-30, e-mail: fox@example.com; a tab\tand a newline\n"
        "She sells sea shells by the sea shore; the shells she sells are sea shells, for sure. "
        "How vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow. ") * 6
SAMPLE = "Hello, world! the fox 42 <|endoftext|> sea shells\n\u00e9\u4e16\U0001f600"


def _files_of(folder: Path) -> dict:
    """Every file under `folder` as relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _gguf_module():
    """The module that maps nt models to GGUF (being moved from nt.io.gguf to nt.models.gguf)."""
    for name in ("nt.models.gguf", "nt.io.gguf"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "write"):
            return module
    raise ImportError("no GGUF model writer in nt.models.gguf or nt.io.gguf")


def _host(model, flat) -> np.ndarray:
    return np.asarray(model.tape.k.to_host(flat))


def _quantized_scales(model) -> list:
    """The f16 block scales of every matrix a Llama keeps quantised (Q8_0: 34-byte blocks,
    Q4_0: 18-byte blocks, scale first), as float32 arrays. Read from the raw blocks so the
    check does not depend on nt's own dequantiser."""
    block_bytes = {"Q8_0": 34, "Q4_0": 18}
    out = []
    for name, ttype in getattr(model, "quantized", {}).items():
        rows = model.qweights.get(name)
        for a in (rows if isinstance(rows, list) else [rows]):
            if a is None or ttype not in block_bytes:
                continue
            blocks = np.ascontiguousarray(a).reshape(-1, block_bytes[ttype])
            scale = blocks[:, :2].copy().view("<f2").astype(np.float32).ravel()
            out.append(scale * (127 if ttype == "Q8_0" else 8))   # |w| <= |scale| * max |q|
    return out


def check_model(model, what: str) -> None:
    """A loaded model must hold finite weights, and a forward on a few ids must give
    logits of the right shape that are finite (unless some weight is huge but finite)."""
    cfg = model.config
    host = _host(model, model.params.flat)
    parts = [host] + _quantized_scales(model)
    for part in parts:
        if part.size and not np.isfinite(part).all():
            bad = int((~np.isfinite(part)).sum())
            raise Invalid(f"{what}: loaded {bad} non-finite weight values (of {part.size})")
    biggest = max((float(np.abs(p).max()) for p in parts if p.size), default=0.0)
    T = int(min(4, cfg.block_size))
    idx = (np.arange(T, dtype=np.int64) * 7 % cfg.vocab_size)[None, :]
    logits, _ = model(idx)
    logits = np.asarray(logits)
    if logits.shape != (1, T, cfg.vocab_size):
        raise Invalid(f"{what}: logits shape {logits.shape}, expected {(1, T, cfg.vocab_size)}")
    if not np.isfinite(logits).all() and biggest <= SANE_WEIGHT:
        raise Invalid(f"{what}: non-finite logits from finite weights (max |w| = {biggest:.3g})")


def check_tokenizer(tok, what: str) -> None:
    """Encoding gives ids in [0, vocab_size); decoding them, and every single id, gives str."""
    n = int(tok.vocab_size)
    for ids in (tok.encode(SAMPLE, allowed_special="all"), tok.encode(SAMPLE)):
        if not all(isinstance(i, (int, np.integer)) and 0 <= i < n for i in ids):
            raise Invalid(f"{what}: encode gave ids outside [0, {n}): {ids[:20]}")
        if not isinstance(tok.decode(ids), str):
            raise Invalid(f"{what}: decode did not return a str")
    if not isinstance(tok.decode(list(range(min(n, 4096)))), str):
        raise Invalid(f"{what}: decode of every id did not return a str")


def _rewrite_header_ints(data: bytes, index: int, value: int) -> bytes:
    """llm.c files: header int32 number `index` set to `value` (wrapped to 32 bits)."""
    return data[:4 * index] + struct.pack("<I", value % 2 ** 32) + data[4 * index + 4:]


# ====================================================================== 1. llm.c checkpoint

LLMC_FIELDS = [Field(n, 4 * i, 4) for i, n in enumerate(["magic", "version", "maxT", "V", "L", "NH", "C", "Vp"])]


def llmc_seeds() -> list:
    from nt.models import GPT2, GPT2Config
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, cfg in [("tiny-v64", GPT2Config.preset("tiny", vocab_size=64)),
                          ("v100-l1", GPT2Config(block_size=8, vocab_size=100, n_layer=1, n_head=2, n_embd=32))]:
            GPT2(cfg, seed=1).save_llmc(Path(d) / "model.bin")
            out.append(Seed(name, {"model.bin": (Path(d) / "model.bin").read_bytes()}))
    return out


def _llmc_consistent(rng, data: bytes) -> tuple[bytes, str]:
    """Change one shape field and resize the parameters to what the new header implies:
    the file is then well-framed, so the loader must judge the header itself."""
    from nt.models.gpt2 import GPT2Config, param_layout
    h = list(struct.unpack_from("<8i", data))
    i = int(pick(rng, [2, 3, 4, 5, 6]))
    h[i] = pick(rng, [1, 2, 3, 5, h[i] + 1, h[i] * 2, 0, -1, 2 ** 31 - 1, 1 << 20])
    try:
        cfg = GPT2Config(block_size=h[2], vocab_size=h[3], n_layer=h[4], n_head=h[5], n_embd=h[6])
        h[7] = cfg.padded_vocab_size
        count = sum(int(np.prod(s)) for _, s, _ in param_layout(cfg))
    except ValueError:
        count = (len(data) - 1024) // 4
    if count > 1 << 26:   # too big to write: keep the old payload, the header now lies
        count = (len(data) - 1024) // 4
    head = struct.pack("<8i", *[(v + 2 ** 31) % 2 ** 32 - 2 ** 31 for v in h]) + data[32:1024]
    body = data[1024:1024 + (len(data) - 1024) // 4 * 4]   # whole floats only (an earlier cut may split one)
    payload = np.resize(np.frombuffer(body, "<f4"), count).tobytes()
    return head + payload, f"header[{i}] := {h[i]} with the payload resized to {count} floats"


def _poison_floats(rng, data: bytes, start: int) -> tuple[bytes, str]:
    """A NaN, an infinity or a huge float written over one fp32 value past `start`."""
    n = (len(data) - start) // 4
    if n <= 0:
        return data, "poison: no payload"
    at = start + 4 * int(rng.integers(n))
    value = pick(rng, [float("nan"), float("inf"), float("-inf"), 3.4e38, 1e20])
    return data[:at] + struct.pack("<f", value) + data[at + 4:], f"float at byte {at} := {value}"


def llmc_mutate(rng, seed: Seed, seeds: list):
    data = seed.files["model.bin"]
    notes = []
    for _ in range(_count(rng)):
        kind = pick(rng, ["bytes", "bytes", "field", "field", "consistent", "poison"])
        if kind == "bytes":
            data, note = byte_mutation(rng, data)
        elif kind == "field":
            data, note = field_mutation(rng, data, LLMC_FIELDS)
        elif kind == "consistent" and len(data) >= 1024:
            data, note = _llmc_consistent(rng, data)
        else:
            data, note = _poison_floats(rng, data, 1024)
        notes.append(note)
    return {"model.bin": data}, notes


def llmc_exercise(folder: Path, params: dict) -> None:
    from nt.models import GPT2
    check_model(GPT2.from_llmc(folder / "model.bin"), "GPT2.from_llmc")


# ====================================================================== 2. llm.c token shard

TOKEN_FIELDS = [Field("magic", 0, 4), Field("version", 4, 4), Field("count", 8, 4)]


def token_seeds() -> list:
    from nt.io import write_llmc_tokens
    rng = np.random.default_rng(5)
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, V, n, dtype in [("u16-v512", 512, 2000, np.uint16), ("u32-v70000", 70000, 400, np.uint32)]:
            write_llmc_tokens(Path(d) / "tokens.bin", rng.integers(0, V, n), dtype=dtype)
            out.append(Seed(name, {"tokens.bin": (Path(d) / "tokens.bin").read_bytes()}, {"vocab_size": V}))
    return out


def token_mutate(rng, seed: Seed, seeds: list):
    data = seed.files["tokens.bin"]
    V = seed.params["vocab_size"]
    notes = []
    for _ in range(_count(rng)):
        kind = pick(rng, ["bytes", "bytes", "field", "field", "count", "token"])
        if kind == "bytes":
            data, note = byte_mutation(rng, data)
        elif kind == "field":
            data, note = field_mutation(rng, data, TOKEN_FIELDS)
        elif kind == "count" and len(data) >= 1024:
            # a new token count with the payload resized to match (well-framed)
            width = 2 if data[4] == 1 else 4
            n = int(pick(rng, [0, 1, 8, 9, 17, 33, 100]))
            data = _rewrite_header_ints(data, 2, n)[:1024] + np.resize(np.frombuffer(data[1024:1024 + 64], np.uint8), n * width).tobytes()
            note = f"count := {n} with the payload resized"
        elif len(data) > 1024:
            # one token id at or past the vocabulary
            width = 2 if data[4] == 1 else 4
            at = 1024 + width * int(rng.integers(max((len(data) - 1024) // width, 1)))
            value = pick(rng, [V, V - 1, V + 1, 2 ** (8 * width) - 1, 2 ** (8 * width - 1)])
            data = data[:at] + (value % 2 ** (8 * width)).to_bytes(width, "little") + data[at + width:]
            note = f"token at byte {at} := {value}"
        else:
            data, note = byte_mutation(rng, data)
        notes.append(note)
    return {"tokens.bin": data}, notes


def token_exercise(folder: Path, params: dict) -> None:
    from nt.data import DataLoader
    from nt.io import read_llmc_tokens
    V = params["vocab_size"]
    path = folder / "tokens.bin"
    tokens = read_llmc_tokens(path, V)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise Invalid(f"read_llmc_tokens gave {tokens.dtype} {tokens.shape}, expected 1-D integers")
    if tokens.size and int(tokens.max()) >= V:
        raise Invalid(f"read_llmc_tokens gave token {int(tokens.max())} >= vocab_size {V}")
    loader = DataLoader([path], B=2, T=8, shuffle=True, seed=1, vocab_size=V)
    for _ in range(3):
        x, y = loader.next_batch()
        if x.shape != (2, 8) or y.shape != (2, 8) or x.min() < 0 or max(int(x.max()), int(y.max())) >= V:
            raise Invalid(f"DataLoader batch out of range or misshapen: {x.shape} {y.shape}")


# ====================================================================== 3. safetensors

def st_seeds() -> list:
    from nt.io import save_safetensors
    r = np.random.default_rng(3)
    sets = {
        "mixed": ({"w": r.standard_normal((3, 4)).astype(np.float32), "h": r.standard_normal(5).astype(np.float16),
                   "i": np.arange(4, dtype=np.int64).reshape(2, 2), "u": np.arange(7, dtype=np.uint8),
                   "b": np.array([True, False, True]), "s": np.array(2.5), "e": np.zeros((0, 3), np.int32)},
                  {"format": "pt", "note": "fuzz seed"}),
        "one": ({"embedding": r.standard_normal((16, 8)).astype(np.float32)}, None),
    }
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, (tensors, meta) in sets.items():
            save_safetensors(Path(d) / "t.safetensors", tensors, meta)
            out.append(Seed(name, {"t.safetensors": (Path(d) / "t.safetensors").read_bytes()}))
    return out


def _st_split(data: bytes):
    """(header dict, data section) of a valid safetensors file, or None."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8:8 + n]), data[8 + n:]
    except (ValueError, RecursionError):   # not JSON (any more), or nested deeper than json recurses
        return None


def _st_join(header_bytes: bytes, body: bytes, rng) -> tuple[bytes, str]:
    """Frame a header: usually with its true length, sometimes with a stale or lying one."""
    n = len(header_bytes)
    lie = pick(rng, [None] * 6 + [n + 1, n - 1, 0, 2 ** 63])
    return (n if lie is None else lie % 2 ** 64).to_bytes(8, "little") + header_bytes + body, \
        "" if lie is None else f" (length field {lie}, true {n})"


def _st_entry(rng, header: dict) -> str:
    """A targeted change to one tensor entry: dtype, shape or data_offsets."""
    names = [k for k in header if k != "__metadata__"]
    if not names:
        header["x"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        return "safetensors add entry 'x'"
    name = pick(rng, names)
    e = header[name]
    part = pick(rng, ["dtype", "shape", "data_offsets", "keys"])
    if not (isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= set(e)):
        # an earlier mutation already broke this entry: rebuild a plausible one to break anew
        e = header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    if part == "dtype":
        e["dtype"] = pick(rng, ["F32", "F16", "BF16", "F64", "I8", "BOOL", "f32", "I128", "F8_E4M3", "", 5, None])
    elif part == "shape":
        s = list(e["shape"]) if isinstance(e["shape"], list) else [1]
        e["shape"] = pick(rng, [s + [1], s[:-1], [], [0], [-1] + s, [2 ** 32, 2 ** 32], [2 ** 62, 4],
                                [1.0] * len(s), [True] * len(s), [str(d) for d in s], s[::-1], 7])
    elif part == "data_offsets":
        offs = e["data_offsets"]
        b, end = offs if isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs) else (0, 4)
        e["data_offsets"] = pick(rng, [[0, end - b], [b, b - 1], [b + 1, end + 1], [0, 2 ** 64], [end, b],
                                       [b, end, end], [b], [-1, end], [b * 1.0, end], [b, 2 ** 63], "0-4"])
    else:
        e.pop(pick(rng, list(e)))
    return f"safetensors entry {name!r} {part} := {e.get(part, '<removed>')!r:.60}"


def st_mutate_bytes(rng, data: bytes) -> tuple[bytes, str]:
    """One mutation of a safetensors file: bytes, the length field, or the header structure."""
    kind = pick(rng, ["bytes", "bytes", "length", "json", "json", "entry", "entry"])
    split = _st_split(data)
    if kind == "length":
        return field_mutation(rng, data, [Field("header length", 0, 8, int.from_bytes(data[:8].ljust(8, b"\0"), "little"))])
    if kind in ("json", "entry") and split is not None and isinstance(split[0], dict):
        header, body = split
        if kind == "json":
            raw, note = json_mutation(rng, json.dumps(header).encode("utf-8"))
        else:
            note = _st_entry(rng, header)
            raw = json.dumps(header).encode("utf-8")
        framed, lie = _st_join(raw, body, rng)
        return framed, note + lie
    return byte_mutation(rng, data)


def st_mutate(rng, seed: Seed, seeds: list):
    data = seed.files["t.safetensors"]
    notes = []
    for _ in range(_count(rng)):
        data, note = st_mutate_bytes(rng, data)
        notes.append(note)
    return {"t.safetensors": data}, notes


def st_exercise(folder: Path, params: dict) -> None:
    from nt.io import load_safetensors
    tensors, meta = load_safetensors(folder / "t.safetensors")
    if not isinstance(tensors, dict) or not isinstance(meta, dict):
        raise Invalid(f"load_safetensors returned {type(tensors).__name__}, {type(meta).__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise Invalid("metadata is not str -> str")
    for name, a in tensors.items():
        if not isinstance(a, np.ndarray) or a.size != int(np.prod(a.shape)):
            raise Invalid(f"tensor {name!r} is not a consistent ndarray")
        a.tobytes()   # every byte must be readable


# ====================================================================== 4. checkpoint folder

CK_TOKENS = (np.arange(400) * 7919 % 61).astype(np.uint16)


def _ck_objects(model):
    """The optimizer, schedule, loader and RNG a checkpoint seed saves and a case restores."""
    from nt.data import DataLoader
    from nt.optim import AdamW, CosineSchedule
    return (AdamW(model.params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1), CosineSchedule(1e-3, warmup=2, total=10),
            DataLoader(CK_TOKENS, B=2, T=8, shuffle=True, seed=5), np.random.default_rng(11))


def ck_seeds() -> list:
    from nt.io import save_checkpoint
    from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
    out = []
    models = [("gpt2", GPT2(GPT2Config.preset("tiny", vocab_size=64, block_size=16), seed=2)),
              ("llama", Llama(LlamaConfig.preset("llama-tiny", vocab_size=64, block_size=16), seed=2))]
    with tempfile.TemporaryDirectory() as d:
        for i, (name, model) in enumerate(models):
            opt, sched, loader, rng = _ck_objects(model)
            x, y = loader.next_batch()
            model.forward(x, y)
            model.zero_grad()
            model.backward()
            opt.step(sched(0))
            rng.random(3)
            folder = Path(d) / name
            save_checkpoint(folder, model, opt, step=7 + i, schedule=sched, loaders={"train": loader},
                            rngs={"data": rng}, extra={"best_val": 1.25, "note": "seed"})
            out.append(Seed(name, _files_of(folder)))
    return out


def _folder_mutation(rng, files: dict, seed: Seed, seeds: list) -> str:
    """Folder-level faults: a file deleted, emptied, replaced by a folder or by the same
    file from another seed (a GPT-2 config beside Llama weights)."""
    name = pick(rng, sorted(k for k, v in files.items() if v is not None and v != DIRECTORY) or sorted(files))
    how = pick(rng, ["delete", "delete", "empty", "folder", "transplant"])
    if how == "delete":
        files[name] = None
    elif how == "empty":
        files[name] = b""
    elif how == "folder":
        files[name] = DIRECTORY
    else:
        donor = pick(rng, seeds)
        files[name] = donor.files.get(name, b"")
        return f"{name}: taken from seed {donor.name!r}"
    return f"{name}: {how}"


def _file_mutation(rng, name: str, data: bytes) -> tuple[bytes, str]:
    """A mutation suited to the file's kind (JSON, safetensors, text), or a byte mutation."""
    if name.endswith(".json") and rng.random() < 0.8:
        return json_mutation(rng, data)
    if name.endswith(".safetensors"):
        return st_mutate_bytes(rng, data)
    if name.endswith(".txt") and rng.random() < 0.7:
        return _line_mutation(rng, data)
    return byte_mutation(rng, data)


def _folder_mutate(rng, seed: Seed, seeds: list, file_mutation: Callable = None):
    """1-3 mutations of a folder: mostly of one file's contents, sometimes of the folder."""
    file_mutation = file_mutation or _file_mutation
    files = dict(seed.files)
    notes = []
    for _ in range(_count(rng)):
        live = sorted(k for k, v in files.items() if isinstance(v, bytes))
        if not live or rng.random() < 0.15:
            notes.append(_folder_mutation(rng, files, seed, seeds))
            continue
        name = pick(rng, live)
        files[name], note = file_mutation(rng, name, files[name])
        notes.append(f"{name}: {note}")
    return files, notes


def ck_exercise(folder: Path, params: dict) -> None:
    from nt.io import load_checkpoint
    ck = load_checkpoint(folder)
    if not isinstance(ck.step, int) or isinstance(ck.step, bool) or ck.step < 0:
        raise Invalid(f"load_checkpoint step is {ck.step!r}")
    check_model(ck.model, "load_checkpoint model")
    # restore into live objects: the optimizer state, schedule, data position and RNG
    opt, sched, loader, rng = _ck_objects(ck.model)
    load_checkpoint(folder, model=ck.model, optimizer=opt, schedule=sched, loaders={"train": loader}, rngs={"data": rng})
    m, v = _host(ck.model, opt.m), _host(ck.model, opt.v)
    if not (np.isfinite(m).all() and np.isfinite(v).all() and (v >= 0).all()):
        raise Invalid("optimizer state m/v non-finite or v negative")
    hyper = (opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay)
    if not (all(np.isfinite(hyper)) and opt.lr >= 0 and opt.eps > 0 and opt.weight_decay >= 0
            and 0 <= opt.beta1 < 1 and 0 <= opt.beta2 < 1):
        raise Invalid(f"optimizer hyperparameters out of range: {hyper}")
    if not isinstance(opt.step_count, int) or opt.step_count < 0:
        raise Invalid(f"optimizer step_count {opt.step_count!r}")
    lr = sched(ck.step)
    if not np.isfinite(lr) or lr < 0:
        raise Invalid(f"schedule gives lr {lr!r} at step {ck.step}")
    x, y = loader.next_batch()
    if x.shape != (2, 8) or int(x.max()) >= 61:
        raise Invalid("data loader restored to an impossible position")
    rng.random(2)


# ====================================================================== 5. tokenizer folder

def tok_seeds() -> list:
    from nt.tokenizer import BPE
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, bpe in [("gpt2-300", BPE.train(TEXT, 300)),
                          ("llama3-290", BPE.train(TEXT, 290, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                                                   pre="llama3"))]:
            bpe.save(Path(d) / name)
            out.append(Seed(name, _files_of(Path(d) / name)))
    return out


def _line_mutation(rng, data: bytes) -> tuple[bytes, str]:
    """merges.txt-style text: lines deleted, duplicated, swapped, split wrongly or junk."""
    lines = data.split(b"\n")
    i = int(rng.integers(len(lines)))
    how = pick(rng, ["delete", "duplicate", "swap", "three_fields", "one_field", "unknown", "junk", "header", "long"])
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "swap":
        j = int(rng.integers(len(lines)))
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "three_fields":
        lines[i] = lines[i] + b" x"
    elif how == "one_field":
        lines[i] = lines[i].replace(b" ", b"")
    elif how == "unknown":
        lines[i] = b"\xe2\x96\x81zz qq"
    elif how == "junk":
        lines[i] = pick(rng, [b"\xff\xfe", b"\x00 \x00", b" ", b"a  b", b"\t\t", b"#version: 9"])
    elif how == "header":
        lines.insert(i, b"#version: 0.2")
    else:
        lines[i] = b"a " + b"b" * 100000
    return b"\n".join(lines), f"merges line {i}: {how}"


def _token_map_mutation(rng, data: bytes) -> tuple[bytes, str]:
    """vocab.json / special_tokens.json ({token: id}) with a consistent-looking lie: a token
    respelled (outside the byte alphabet, empty, a lone surrogate, another token's name),
    two tokens sharing an id, ids swapped, or an id pushed out of the vocabulary's range."""
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return byte_mutation(rng, data)
    if not isinstance(vocab, dict) or not vocab:
        return json_mutation(rng, data)
    items = list(vocab.items())
    i = int(rng.integers(len(items)))
    key, value = items[i]
    how = pick(rng, ["respell", "respell", "share_id", "swap_ids", "id_range"])
    if how == "respell":
        new = pick(rng, ["\u00e9", "a b", "\u0000", "", "<|endoftext|>", "\ud800", "\u0120" * 300,
                         items[int(rng.integers(len(items)))][0]])
        items[i] = (new, value)
        note = f"token {key!r:.20} respelled {new!r:.20}"
    elif how == "share_id":
        other = items[int(rng.integers(len(items)))]
        items[i] = (key, other[1])
        note = f"token {key!r:.20} given the id of {other[0]!r:.20} ({other[1]!r})"
    elif how == "swap_ids":
        j = int(rng.integers(len(items)))
        items[i], items[j] = (key, items[j][1]), (items[j][0], value)
        note = f"ids of tokens #{i} and #{j} swapped"
    else:
        new = pick(rng, [-1, len(items), len(items) + 1000, 2 ** 31, 2 ** 40, 0])
        items[i] = (key, new)
        note = f"token {key!r:.20} id {value!r} -> {new}"
    # DupDict keeps a respelling that collides with another token as a duplicate key
    return dumps(DupDict(items)).encode("utf-8"), note


def _tok_file_mutation(rng, name: str, data: bytes) -> tuple[bytes, str]:
    if name in ("vocab.json", "special_tokens.json") and rng.random() < 0.5:
        return _token_map_mutation(rng, data)
    return _file_mutation(rng, name, data)


def tok_mutate(rng, seed: Seed, seeds: list):
    return _folder_mutate(rng, seed, seeds, _tok_file_mutation)


def tok_exercise(folder: Path, params: dict) -> None:
    from nt.tokenizer import BPE
    check_tokenizer(BPE.load(folder), "BPE.load")


# ====================================================================== 6. GGUF

def _sp_metadata() -> dict:
    """A small SentencePiece ("llama") vocabulary: unk, bos, eos, 256 byte tokens, pieces."""
    pieces = ["\u2581", "e", "t", "h", "o", "\u2581t", "he", "\u2581the", "\u2581a", "s"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array([0.0] * 259 + [-float(i) for i in range(len(pieces))], np.float32),
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.bos_token_id": np.uint32(1),
            "tokenizer.ggml.eos_token_id": np.uint32(2), "tokenizer.ggml.unknown_token_id": np.uint32(0),
            "tokenizer.ggml.add_bos_token": True}


def _bpe_metadata() -> tuple[dict, int]:
    """A byte-level BPE ("gpt2") vocabulary trained on TEXT, spelled as GGUF stores it."""
    from nt.tokenizer import BPE
    with tempfile.TemporaryDirectory() as d:
        BPE.train(TEXT, 300).save(d)
        vocab = json.loads((Path(d) / "vocab.json").read_text(encoding="utf-8"))
        merges = (Path(d) / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = np.array([3 if t.startswith("<|") else 1 for t in tokens], np.int32)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.eos_token_id": np.uint32(len(tokens) - 1)}, len(tokens)


def gguf_seeds() -> list:
    from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
    write = _gguf_module().write
    bpe_meta, bpe_n = _bpe_metadata()
    sp_meta = _sp_metadata()
    gpt2 = lambda V: GPT2(GPT2Config.preset("tiny", vocab_size=V, block_size=16), seed=4)  # noqa: E731
    llama = lambda V, **kw: Llama(LlamaConfig.preset("llama-tiny", vocab_size=V, block_size=16, **kw), seed=4)  # noqa: E731
    specs = [("gpt2-f32", gpt2(64), "F32", None), ("gpt2-q8", gpt2(64), "Q8_0", None),
             ("llama-f32", llama(64), "F32", None), ("llama-q8", llama(64), "Q8_0", None),
             ("llama-q4-untied-sp", llama(len(sp_meta["tokenizer.ggml.tokens"]), tie_embeddings=False,
                                          rope_pairing="interleaved"), "Q4_0", sp_meta),
             ("gpt2-f32-bpe", gpt2(bpe_n), "F32", bpe_meta)]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, model, dtype, meta in specs:
            write(Path(d) / "model.gguf", model, dtype, metadata=meta)
            out.append(Seed(name, {"model.gguf": (Path(d) / "model.gguf").read_bytes()}))
    return out


def gguf_mutate_bytes(rng, data: bytes) -> tuple[bytes, str]:
    kind = pick(rng, ["struct", "struct", "struct", "field", "field", "bytes", "bytes"])
    try:
        doc = gguf_struct.parse(data)
    except Exception:   # an earlier mutation broke the framing: only bytes make sense now
        return byte_mutation(rng, data)
    if kind == "struct":
        note = gguf_struct.mutate_doc(rng, doc)
        return gguf_struct.serialise(doc), note
    if kind == "field":
        return field_mutation(rng, data, doc.fields)
    return byte_mutation(rng, data)


def gguf_mutate(rng, seed: Seed, seeds: list):
    data = seed.files["model.gguf"]
    notes = []
    for _ in range(_count(rng)):
        data, note = gguf_mutate_bytes(rng, data)
        notes.append(note)
    return {"model.gguf": data}, notes


def gguf_exercise(folder: Path, params: dict) -> None:
    from nt.models import from_gguf
    for keep in (False, True):
        model = from_gguf(folder / "model.gguf", keep_quantized=keep)
        check_model(model, f"from_gguf(keep_quantized={keep})")
        if getattr(model, "tokenizer", None) is not None:
            check_tokenizer(model.tokenizer, "GGUF tokenizer")


# ====================================================================== registry

def _count(rng) -> int:
    """How many mutations to stack: mostly one; a second fault often hides behind the first."""
    return 1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("llmc", llmc_seeds, llmc_mutate, llmc_exercise),
    Format("tokens", token_seeds, token_mutate, token_exercise),
    Format("safetensors", st_seeds, st_mutate, st_exercise),
    Format("checkpoint", ck_seeds, _folder_mutate, ck_exercise),
    Format("tokenizer", tok_seeds, tok_mutate, tok_exercise),
    Format("gguf", gguf_seeds, gguf_mutate, gguf_exercise),
]}
