"""Every nt.io reader facing corrupted bytes: it either reads the file or raises
FormatError, never another exception (MemoryError, OverflowError, KeyError, ...)."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest

import nt.io
from nt.io import (FormatError, load_checkpoint, load_safetensors, read_llmc_checkpoint, read_llmc_tokens,
                   save_checkpoint, save_safetensors, write_llmc_tokens)
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig

IO_DIR = Path(nt.io.__file__).parent


def mutations(data: bytes, seed: int, count: int, region: int):
    """`count` corrupted copies of data: random bytes overwritten within its first `region`
    bytes (where the headers are), or the file cut short."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        raw = bytearray(data)
        if rng.random() < 0.2:
            yield bytes(raw[:int(rng.integers(0, len(raw)))])
            continue
        for pos in rng.integers(0, min(region, len(raw)), size=int(rng.integers(1, 4))):
            raw[pos] = int(rng.integers(0, 256))
        yield bytes(raw)


def only_format_errors(path: Path, data: bytes, read, seed: int, count: int = 150, region: int = 256):
    for corrupted in mutations(data, seed, count, region):
        path.write_bytes(corrupted)
        try:
            read(path)
        except FormatError:
            pass


def test_corrupted_safetensors(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors(path, {"w": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.int64),
                            "s": np.array(1.5)}, {"k": "v"})
    only_format_errors(path, path.read_bytes(), load_safetensors, seed=0, count=400)


def test_corrupted_llmc_files(tmp_path):
    path = tmp_path / "m.bin"
    GPT2(GPT2Config(block_size=4, vocab_size=10, n_layer=1, n_head=1, n_embd=4), seed=0).save_llmc(path)
    only_format_errors(path, path.read_bytes(), read_llmc_checkpoint, seed=1, region=32)
    only_format_errors(path, path.read_bytes(), GPT2.from_llmc, seed=2, region=32)
    write_llmc_tokens(path, np.arange(50))
    only_format_errors(path, path.read_bytes(), lambda p: read_llmc_tokens(p, vocab_size=40), seed=3, region=16)


def tiny_model(kind: str):
    if kind == "gpt2":
        return GPT2(GPT2Config(block_size=4, vocab_size=10, n_layer=1, n_head=1, n_embd=4), seed=0)
    return Llama(LlamaConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=8, vocab_size=10,
                             block_size=8, rope_scaling=(8.0, 1.0, 4.0, 4)), seed=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["state.json", "config.json"])
def test_corrupted_checkpoint_json(tmp_path, name, kind):
    model = tiny_model(kind)
    folder = save_checkpoint(tmp_path / "ck", model, step=2)
    data = (folder / name).read_bytes()
    only_format_errors(folder / name, data, lambda p: load_checkpoint(p.parent), seed=4, count=100,
                       region=len(data))
    # structurally valid JSON with each value swapped for a value of another type
    obj = json.loads(data)
    targets = [(obj, key) for key in obj] + [(obj["config"], key) for key in obj.get("config", {})]
    for parent, key in targets:
        for value in (None, True, -1, 2 ** 70, 1.5, "x", [], {}):
            saved = parent[key]
            parent[key] = value
            (folder / name).write_text(json.dumps(obj))
            try:
                load_checkpoint(folder)
            except FormatError:
                pass
            parent[key] = saved


def module_level_imports(path: Path) -> list[str]:
    """The modules a file imports outside any function (relative ones as written, '..models')."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("name", ["__init__.py", "common.py", "llmc.py", "safetensors.py", "checkpoint.py"])
def test_io_does_not_import_the_models(name):
    """The models import nt.io; nt.io reaches the models only inside functions that build one."""
    imports = module_level_imports(IO_DIR / name)
    assert not [m for m in imports if m.startswith("..models") or m.startswith("nt.models") or m == ".."], imports


def test_atomic_write_takes_one_bytes_object_as_one_chunk(tmp_path):
    """A bytes object passed alone is written as it is (iterating it would write ints)."""
    from nt.io.common import atomic_write
    atomic_write(tmp_path / "a.bin", b"\xe2\x96\x81abc")
    atomic_write(tmp_path / "b.bin", [b"ab", np.arange(2, dtype=np.uint8)])
    assert (tmp_path / "a.bin").read_bytes() == b"\xe2\x96\x81abc"
    assert (tmp_path / "b.bin").read_bytes() == b"ab\x00\x01"
