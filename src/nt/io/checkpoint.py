"""Training checkpoints: a folder that resumes a run exactly, written atomically.

    step_00000300/
        model.safetensors      every named parameter (GPT-2 names: wte, wpe, qkvw, ...;
                               per-layer weights stacked as (L, ...))
        trainable.safetensors  instead of model.safetensors in a checkpoint of a run that
                               trains a separate parameter set on a frozen model (LoRA
                               adapters: q.A, q.B, ...); config.json still describes the
                               base, whose weights the run keeps elsewhere (see `params`)
        config.json            {"model": "GPT2", "config_class": "GPT2Config", "dtype": "float32",
                                "config": {...}}
        optimizer.safetensors  optimizer arrays (AdamW: m, v) -- when an optimizer is given
        state.json             step, optimizer scalars, schedule, data loader positions,
                               RNG states (incl. the tape's dropout counter), anything
                               extra (e.g. the loss scaler's state_dict())

`save_checkpoint` writes everything into a hidden temporary folder `.NAME.tmp-PID`, fsyncs
each file and the folder, then renames it into place: a crash mid-save leaves no half
checkpoint. Replacing an existing NAME takes two renames (NAME -> `.NAME.old-PID`, the new
folder -> NAME; Linux cannot rename a folder over a non-empty one): a crash between them
leaves the complete old folder under `.NAME.old-PID`, which the loaders fall back to while
NAME is missing and the next save puts back. A run folder holds step_* checkpoints and a
`latest` file naming the newest, replaced atomically after the checkpoint is complete
(`save_run_checkpoint`, `latest_checkpoint`).

Loading treats the folder as hostile: config.json, state.json and the safetensors headers
are validated (types, keys, sizes, parameter shapes against the config) before any model
is built, and every problem is a FormatError naming the file. A folder the caller names
that does not exist is a FileNotFoundError; a file missing inside it is a FormatError.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .common import FormatError, atomic_write_text, expect, read_json, require_finite
from .safetensors import TensorInfo, load_safetensors, read_safetensors_header, save_safetensors

MODEL_WEIGHTS = "model.safetensors"
TRAINABLE_WEIGHTS = "trainable.safetensors"
FORMAT = "nt-checkpoint"
VERSION = 1
LATEST = "latest"
STEP_NAME = re.compile(r"step_\d{8,}")               # what `latest` may name
_TEMPORARY = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")   # .NAME.tmp-PID / .NAME.old-PID
DTYPES = ("float32", "float64")                     # parameter dtypes a checkpoint may ask for
_CONFIG_KEYS = {"model", "config_class", "dtype", "config"}
_FLOAT_TENSORS = ("BF16", "F16", "F32", "F64")
_MAX_CONFIG_INT = 2 ** 31 - 1   # no real model size comes near; bounds what a config can ask for
_MAX_LATEST_BYTES = 256

# Test hook: called with each file's path right after it is written, and with the old
# folder's path right after a replaced checkpoint is moved aside (crash tests use it to
# kill the writer between steps). None in normal use.
_after_file: Optional[Callable[[Path], None]] = None


@dataclasses.dataclass
class Checkpoint:
    """What `load_checkpoint` restored: the model, the step to continue from, the raw state."""
    path: Path
    model: Any
    step: int
    extra: dict
    state: dict


# ---------------------------------------------------------------------- file helpers

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    try:
        text = json.dumps(obj, indent=1, allow_nan=False)
    except ValueError as e:  # the reader refuses NaN: never write a checkpoint it cannot load
        raise ValueError(f"{path.name}: cannot store {e} (NaN or infinity in the state?)") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _written(path)


def _written(path: Path) -> None:
    if _after_file is not None:
        _after_file(path)


def _inner_file(directory: Path, name: str) -> Path:
    """directory/name, which the checkpoint format requires: a FormatError if missing."""
    path = directory / name
    if not path.is_file():
        raise FormatError(f"{path}: missing (not a complete nt checkpoint)")
    return path


def resolve_checkpoint(directory) -> Path:
    """The checkpoint folder at `directory`, or, while a save replacing it is between its two renames (or was killed
    there), the complete previous version kept beside it as .NAME.old-PID."""
    directory = Path(directory)
    if directory.is_dir():
        return directory
    kept = [p for p in directory.parent.glob(f".{glob.escape(directory.name)}.old-*") if (p / "state.json").is_file()]
    if kept:
        return max(kept, key=lambda p: p.stat().st_mtime)
    raise FileNotFoundError(f"no checkpoint folder at {directory}")


def _stale(pid: int) -> bool:
    """Whether a temporary named with `pid` belongs to no writer still at work: its process
    is gone, or it is this process's own, left by an earlier save that failed (a process
    saves one checkpoint at a time). A dead writer's PID reused by an unrelated process
    only delays the clean-up."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process / no real pid: leave it alone
        return False
    return False


def _clean_stale(folder: Path, name: Optional[str] = None) -> None:
    """Finish what writers that died left in `folder` (see _stale): temporaries
    (.NAME.tmp-PID, folders of save_checkpoint and files of atomic_write) are deleted; an
    old version moved aside (.NAME.old-PID) is put back when NAME is missing, else
    deleted. With `name`, only that NAME's entries."""
    for entry in folder.iterdir():
        m = _TEMPORARY.fullmatch(entry.name)
        if not m or (name is not None and m.group(1) != name) or not _stale(int(m.group(3))):
            continue
        target = folder / m.group(1)
        if m.group(2) == "old" and not target.exists() and (entry / "state.json").is_file():
            os.rename(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _split_arrays(obj, prefix: str, arrays: dict):
    """obj with every ndarray replaced by {"__tensor__": name}; the arrays go to `arrays`."""
    if isinstance(obj, np.ndarray) or hasattr(obj, "__cuda_array_interface__"):
        arrays[prefix] = obj if isinstance(obj, np.ndarray) else obj.copy_to_host()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {str(k): _split_arrays(v, f"{prefix}.{k}" if prefix else str(k), arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_arrays(v, f"{prefix}.{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join_arrays(obj, arrays: dict, where: Path):
    if isinstance(obj, dict) and set(obj) == {"__tensor__"}:
        name = expect(obj["__tensor__"], str, str(where), "a __tensor__ reference")
        if name not in arrays:
            raise FormatError(f"{where}: state names tensor {name!r}, which is not in the file")
        return np.array(arrays[name])
    if isinstance(obj, dict):
        return {k: _join_arrays(v, arrays, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, arrays, where) for v in obj]
    return obj


# ---------------------------------------------------------------------- validation

def _read_state(path: Path) -> dict:
    """state.json, every field of the format checked (the optimizer's, loaders' and RNGs'
    own contents are checked by whoever they are handed to, see _restore)."""
    state = expect(read_json(path, what="the checkpoint's state"), dict, str(path), "the top level")
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise FormatError(f"{path}: not an {FORMAT} version {VERSION} state file")
    kinds = {"format": str, "version": int, "step": int, "optimizer": dict, "schedule": (dict, type(None)),
             "data": dict, "rng": dict, "tape": dict, "extra": dict}
    unknown = sorted(set(state) - set(kinds))
    if unknown:
        raise FormatError(f"{path}: unknown key {unknown[0]!r:.80}")
    for key, kind in kinds.items():
        if key not in state and key != "optimizer":
            raise FormatError(f"{path}: key {key!r} is missing")
        if key in state:
            expect(state[key], kind, str(path), key)
    if state["step"] < 0:
        raise FormatError(f"{path}: step must be >= 0, got {state['step']}")
    for key in ("data", "rng"):
        for name, value in state[key].items():
            expect(value, dict, str(path), f"{key}[{name!r}]")
    for name, value in state["tape"].items():
        if name not in ("seed", "step"):  # names become attributes of the tape: allow only these
            raise FormatError(f"{path}: tape[{name!r}] is not a tape setting (seed, step)")
        expect(value, int, str(path), f"tape[{name!r}]")
    return state


def _model_table() -> dict:
    """The classes a config.json may name: its "model" -> (model class, config class,
    parameter layout function). Nothing else in nt.models is reachable from a file."""
    from ..models import gpt2, llama, vit
    return {"GPT2": (gpt2.GPT2, gpt2.GPT2Config, gpt2.param_layout),
            "Llama": (llama.Llama, llama.LlamaConfig, llama.param_layout),
            "ViT": (vit.ViT, vit.ViTConfig, vit.param_layout)}


def _number(where: str, key: str, value) -> float:
    """A JSON number that is a float in range (ints past 2**53 would lose digits or, past
    float's range, raise OverflowError where the config converts them)."""
    if isinstance(expect(value, (int, float), where, key), int) and abs(value) > 2 ** 53:
        raise FormatError(f"{where}: {key} = {value!r:.40} is out of range for a float")
    return float(value)


def _config_value(where: str, key: str, value, default):
    """A config field's value checked against the kind of its default: bool, int (below
    2**31), float (a number), str, or (default None) null or a list of numbers."""
    if isinstance(default, bool):
        return expect(value, bool, where, key)
    if isinstance(default, int):
        if abs(expect(value, int, where, key)) > _MAX_CONFIG_INT:
            raise FormatError(f"{where}: {key} = {value!r:.40} is out of range (|value| < 2**31)")
        return value
    if isinstance(default, float):
        return _number(where, key, value)
    if isinstance(default, str):
        return expect(value, str, where, key)
    if default is None:
        return None if value is None else [_number(where, f"{key} element", v) for v in expect(value, list, where, key)]
    raise TypeError(f"config field {key} has a default of unsupported type {type(default).__name__}")


def _read_config(path: Path):
    """(model class, config, parameter layout, dtype name) config.json describes, every key
    and value validated before the config object is made; nothing is built."""
    where = str(path)
    info = expect(read_json(path, what="the model's config"), dict, where, "the top level")
    unknown = sorted(set(info) - _CONFIG_KEYS)
    if unknown:
        raise FormatError(f"{where}: unknown key {unknown[0]!r:.80}")
    for key in ("model", "config_class", "config"):
        if key not in info:
            raise FormatError(f"{where}: key {key!r} is missing")
    table = _model_table()
    name = expect(info["model"], str, where, "model")
    if name not in table:
        raise FormatError(f"{where}: unknown model {name!r:.80} (known: {', '.join(table)})")
    model_cls, config_cls, layout = table[name]
    if info["config_class"] != config_cls.__name__:
        raise FormatError(f"{where}: config_class {info['config_class']!r:.80} does not go with model {name!r} "
                          f"({config_cls.__name__})")
    dtype = info.get("dtype", "float32")
    if dtype not in DTYPES:
        raise FormatError(f"{where}: dtype {dtype!r:.80} is not supported (known: {', '.join(DTYPES)})")
    values = expect(info["config"], dict, where, "config")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key in values:
        if key not in fields:
            raise FormatError(f"{where}: config key {key!r:.80} is not a field of {config_cls.__name__}")
    # a field added to a config class after checkpoints were written is listed in its
    # ADDED_FIELDS and takes its default (which reproduces the older behaviour) when absent
    for key in fields:
        if key not in values and key not in getattr(config_cls, "ADDED_FIELDS", ()):
            raise FormatError(f"{where}: config key {key!r} is missing")
    values = {key: values.get(key, fields[key].default) for key in fields}
    checked = {key: _config_value(where, f"config.{key}", values[key], fields[key].default) for key in fields}
    try:
        config = config_cls(**checked)
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: config describes an impossible {name}: {e}") from None
    return model_cls, config, layout(config), dtype


def _check_parameters(path: Path, entries: dict[str, TensorInfo], shapes: dict[str, tuple]) -> None:
    """The safetensors header's tensors are exactly the expected parameters, each of the
    expected shape and a float dtype."""
    missing = [n for n in shapes if n not in entries]
    unexpected = [n for n in entries if n not in shapes]
    if missing or unexpected:
        raise FormatError(f"{path}: parameters do not match the model: missing {missing}, "
                          f"unexpected {unexpected[:20]}")
    for name, shape in shapes.items():
        info = entries[name]
        if info.shape != tuple(shape):
            raise FormatError(f"{path}: parameter {name!r} has shape {info.shape}, the model expects {tuple(shape)}")
        if info.dtype not in _FLOAT_TENSORS:
            raise FormatError(f"{path}: parameter {name!r} is stored as {info.dtype}, expected one of {_FLOAT_TENSORS}")


def _restore(where: Path, what: str, apply: Callable[[], None]) -> None:
    """Run `apply`, which hands saved state to an object's own loader (optimizer, schedule,
    data loader, RNG): that loader's complaints about the state become FormatErrors."""
    try:
        apply()
    except FormatError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
        raise FormatError(f"{where}: the saved {what} does not fit: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------- optimizer adapter

def optimizer_state(optimizer) -> dict:
    """The optimizer's full state: its state_dict() when it has one, else AdamW's fields."""
    if hasattr(optimizer, "state_dict"):
        return optimizer.state_dict()
    k = optimizer.k
    return {"step_count": optimizer.step_count, "m": k.to_host(optimizer.m), "v": k.to_host(optimizer.v)}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Inverse of optimizer_state."""
    if hasattr(optimizer, "load_state_dict"):
        optimizer.load_state_dict(state)
        return
    k = optimizer.k
    for name in ("m", "v"):
        value = np.asarray(state[name])
        if value.shape != tuple(getattr(optimizer, name).shape):
            raise ValueError(f"optimizer state {name!r} has shape {value.shape}, the optimizer {getattr(optimizer, name).shape}")
        k.copy_(getattr(optimizer, name), k.to_device(value.astype(optimizer.params.dtype)))
    optimizer.step_count = int(state["step_count"])


def _stateful(obj) -> Optional[dict]:
    if obj is None:
        return None
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if hasattr(obj, "state"):
        return obj.state()
    return {k: v for k, v in vars(obj).items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------- save / load

def save_checkpoint(directory, model, optimizer=None, *, step: int = 0, schedule=None,
                    loaders: Optional[Mapping[str, Any]] = None,
                    rngs: Optional[Mapping[str, np.random.Generator]] = None,
                    extra: Optional[dict] = None, params=None) -> Path:
    """Write a complete checkpoint folder at `directory`, atomically (replacing one there).

    model: anything with `.params` (nt.Params) and a dataclass `.config` (GPT2, Llama...).
    loaders: name -> DataLoader (their state()); rngs: name -> np.random.Generator;
    extra: JSON-able values to keep (e.g. the loss scaler's state, the best val loss).
    params: a Params to store instead of the model's weights (trainable.safetensors): a
    LoRA run's adapters, so its checkpoints do not copy the frozen base (keep where the
    base comes from in `extra`; load_checkpoint(params=...) restores them).
    Leftovers of earlier saves of this name that died are cleaned up first (_clean_stale).
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target.parent, target.name)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    stored = model.params if params is None else params
    weights = tmp / (MODEL_WEIGHTS if params is None else TRAINABLE_WEIGHTS)
    tensors = {name: stored.k.to_host(t.data) for name, t in stored.items()}
    save_safetensors(weights, tensors, {"format": FORMAT, "model": type(model).__name__})
    _written(weights)
    _write_json(tmp / "config.json", {"model": type(model).__name__, "config_class": type(model.config).__name__,
                                      "dtype": str(model.params.dtype), "config": dataclasses.asdict(model.config)})
    state: dict = {"format": FORMAT, "version": VERSION, "step": int(step)}
    if optimizer is not None:
        arrays: dict = {}
        state["optimizer"] = _split_arrays(optimizer_state(optimizer), "", arrays)
        save_safetensors(tmp / "optimizer.safetensors", arrays, {"format": FORMAT})
        _written(tmp / "optimizer.safetensors")
    state["schedule"] = _stateful(schedule)
    state["data"] = {name: loader.state() for name, loader in (loaders or {}).items()}
    state["rng"] = {name: g.bit_generator.state for name, g in (rngs or {}).items()}
    # the tape's counter-based RNG (dropout masks come from (seed, step, call, index))
    state["tape"] = {name: int(getattr(model.tape, name)) for name in ("seed", "step") if hasattr(model.tape, name)}
    state["extra"] = extra or {}
    _write_json(tmp / "state.json", state)  # last: its presence marks a complete folder
    _fsync_dir(tmp)

    if target.exists():  # same name saved again: move the old one aside, the new one in, then delete the old
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        _written(old)  # a crash from here until the next rename leaves `old` for the loaders
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    return target


def load_model(directory, device: str = "cpu", dtype=None):
    """Build the model a checkpoint folder describes and load its weights.

    config.json is validated (model among GPT2 and Llama, every config key and value,
    dtype float32 or float64) and the parameter shapes it implies are compared with
    model.safetensors' header before anything is built or read. `dtype` overrides the
    saved one."""
    directory = resolve_checkpoint(Path(directory))
    model_cls, config, layout, saved_dtype = _read_config(directory / "config.json")
    if not (directory / MODEL_WEIGHTS).is_file() and (directory / TRAINABLE_WEIGHTS).is_file():
        raise FormatError(f"{directory}: holds only a run's trainable parameters ({TRAINABLE_WEIGHTS}, e.g. LoRA "
                          "adapters), not the model's weights: load its base (see state.json's extra) and restore "
                          "them with load_checkpoint(params=...)")
    weights = _inner_file(directory, MODEL_WEIGHTS)
    entries, _, _ = read_safetensors_header(weights)
    _check_parameters(weights, entries, {name: shape for name, shape, _ in layout})
    model = model_cls(config, device=device, dtype=np.dtype(dtype or saved_dtype), seed=None)
    load_weights(weights, model)
    return model


def load_weights(path, model) -> None:
    """Copy every parameter of `model` from a safetensors file (names and shapes must
    match, checked on the header before the data is read)."""
    _load_params(path, model.params)


def _load_params(path, params) -> None:
    """Copy every tensor of `params` from a safetensors file (names and shapes checked first)."""
    entries, _, _ = read_safetensors_header(path)
    _check_parameters(Path(path), entries, {name: t.shape for name, t in params.items()})
    tensors, _ = load_safetensors(path)
    k = params.k
    for name, t in params.items():
        values = require_finite(tensors[name].reshape(-1), f"{path}: parameter {name!r}")
        k.copy_(t.flat, k.to_device(np.ascontiguousarray(values, dtype=params.dtype)))


def load_checkpoint(directory, model=None, optimizer=None, *, schedule=None,
                    loaders: Optional[Mapping[str, Any]] = None,
                    rngs: Optional[Mapping[str, np.random.Generator]] = None,
                    device: str = "cpu", dtype=None, weights: bool = True, params=None) -> Checkpoint:
    """Restore what `save_checkpoint` wrote into the given objects (each optional).

    Without `model`, one is built from config.json (load_model). weights=False leaves a
    given `model`'s parameters alone: for a caller who built it with load_model from this
    same folder, so the weights are not read twice (the tape's RNG state is still restored).
    `params`: restore the Params a save with `params` stored (trainable.safetensors, e.g.
    LoRA adapters); the given model (the base, set up by the caller) is left alone.
    Training continues at `.step`.
    """
    directory = resolve_checkpoint(Path(directory))
    state = _read_state(directory / "state.json")
    if params is not None:
        if model is None:
            raise ValueError("load_checkpoint(params=...) needs the model the parameters belong to")
        _load_params(_inner_file(directory, TRAINABLE_WEIGHTS), params)
    elif model is None:
        model = load_model(directory, device=device, dtype=dtype)
    elif weights:
        load_weights(_inner_file(directory, MODEL_WEIGHTS), model)
    for name, value in state["tape"].items():
        setattr(model.tape, name, value)
    if optimizer is not None:
        if "optimizer" not in state:
            raise FormatError(f"{directory}: the checkpoint holds no optimizer state")
        path = _inner_file(directory, "optimizer.safetensors")
        arrays, _ = load_safetensors(path)
        saved = _join_arrays(state["optimizer"], arrays, path)
        _restore(directory, "optimizer state", lambda: load_optimizer_state(optimizer, saved))
    if schedule is not None and state["schedule"] is not None and hasattr(schedule, "load_state_dict"):
        _restore(directory, "schedule", lambda: schedule.load_state_dict(state["schedule"]))
    for name, loader in (loaders or {}).items():
        if name not in state["data"]:
            raise FormatError(f"{directory}: no position saved for data loader {name!r}")
        _restore(directory, f"position of data loader {name!r}", lambda: loader.set_state(state["data"][name]))
    for name, g in (rngs or {}).items():
        if name not in state["rng"]:
            raise FormatError(f"{directory}: no state saved for RNG {name!r}")
        _restore(directory, f"state of RNG {name!r}", lambda: setattr(g.bit_generator, "state", state["rng"][name]))
    return Checkpoint(directory, model, state["step"], state["extra"], state)


def checkpoint_state(directory) -> dict:
    """A checkpoint folder's state.json, validated (step, extra, ...): what a script reads
    before it builds the model to resume, e.g. where a LoRA run's base came from."""
    return _read_state(resolve_checkpoint(Path(directory)) / "state.json")


# ---------------------------------------------------------------------- run folders

def save_run_checkpoint(out_dir, step: int, model, optimizer=None, keep_last: int = 0, **kwargs) -> Path:
    """save_checkpoint into out_dir/step_XXXXXXXX, point out_dir/latest at it, and delete
    all but the newest `keep_last` step folders (0 keeps all). What writers that died left
    in out_dir (temporary folders and files, checkpoints moved aside) is cleaned up first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    path = save_checkpoint(out_dir / f"step_{step:08d}", model, optimizer, step=step, **kwargs)
    atomic_write_text(out_dir / LATEST, path.name + "\n")
    _fsync_dir(out_dir)
    _written(out_dir / LATEST)
    if keep_last > 0:
        for old in sorted(out_dir.glob("step_*"))[:-keep_last]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The checkpoint out_dir/latest names, or None when there is none yet. The pointer
    must name a step_XXXXXXXX folder inside out_dir holding a complete checkpoint."""
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST
    if not pointer.exists():
        return None
    if not pointer.is_file() or pointer.stat().st_size > _MAX_LATEST_BYTES:
        raise FormatError(f"{pointer}: not a small text file naming a checkpoint")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise FormatError(f"{pointer}: not valid UTF-8 (byte {e.start})") from None
    if not STEP_NAME.fullmatch(name):
        raise FormatError(f"{pointer}: names {name!r:.80}, expected a step_XXXXXXXX folder of {out_dir}")
    try:
        path = resolve_checkpoint(out_dir / name)
    except FileNotFoundError:
        raise FormatError(f"{pointer}: names {name}, which does not exist") from None
    if path.resolve().parent != out_dir.resolve():  # e.g. step_X a symlink to elsewhere
        raise FormatError(f"{pointer}: {name} leads outside {out_dir}")
    if not (path / "state.json").is_file():
        raise FormatError(f"{pointer} names {name}, which is not a complete checkpoint")
    return path
