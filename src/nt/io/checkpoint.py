"""Training checkpoints: a folder that resumes a run exactly, written atomically.

    step_00000300/
        model.safetensors      every named parameter (GPT-2 names: wte, wpe, qkvw, ...;
                               per-layer weights stacked as (L, ...))
        config.json            {"model": "GPT2", "config_class": "GPT2Config", "config": {...}}
        optimizer.safetensors  optimizer arrays (AdamW: m, v) -- when an optimizer is given
        state.json             step, optimizer scalars, schedule, data loader positions,
                               RNG states (incl. the tape's dropout counter), anything
                               extra (e.g. the loss scaler's state_dict())

`save_checkpoint` writes everything into a hidden temporary folder, fsyncs each file and
the folder, then renames it into place: a crash mid-save leaves no half checkpoint. A run
folder holds step_* checkpoints and a `latest` file naming the newest, replaced atomically
after the checkpoint is complete (`save_run_checkpoint`, `latest_checkpoint`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .common import FormatError
from .safetensors import load_safetensors, save_safetensors

FORMAT = "nt-checkpoint"
VERSION = 1
LATEST = "latest"

# Test hook: called with each file's path right after it is written (crash tests use it
# to kill the writer between files). None in normal use.
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
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _written(path)


def _written(path: Path) -> None:
    if _after_file is not None:
        _after_file(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing (not a complete nt checkpoint)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None


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
        if obj["__tensor__"] not in arrays:
            raise FormatError(f"{where}: state names tensor {obj['__tensor__']!r}, which is not in the file")
        return np.array(arrays[obj["__tensor__"]])
    if isinstance(obj, dict):
        return {k: _join_arrays(v, arrays, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, arrays, where) for v in obj]
    return obj


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
                    extra: Optional[dict] = None) -> Path:
    """Write a complete checkpoint folder at `directory`, atomically (replacing one there).

    model: anything with `.params` (nt.Params) and a dataclass `.config` (GPT2, Llama...).
    loaders: name -> DataLoader (their state()); rngs: name -> np.random.Generator;
    extra: JSON-able values to keep (e.g. the loss scaler's state, the best val loss).
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    k = model.params.k
    tensors = {name: k.to_host(t.data) for name, t in model.params.items()}
    save_safetensors(tmp / "model.safetensors", tensors, {"format": FORMAT, "model": type(model).__name__})
    _written(tmp / "model.safetensors")
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

    if target.exists():  # same step saved again: swap the old one out, then delete it
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    return target


def load_model(directory, device: str = "cpu", dtype=None):
    """Build the model a checkpoint folder describes and load its weights."""
    from .. import models
    directory = Path(directory)
    info = _read_json(directory / "config.json")
    try:
        model_cls, config_cls = getattr(models, info["model"]), getattr(models, info["config_class"])
    except (KeyError, AttributeError):
        raise FormatError(f"{directory / 'config.json'}: unknown model {info.get('model')!r} / "
                          f"{info.get('config_class')!r}") from None
    config = config_cls(**info["config"])
    dtype = np.dtype(dtype or info.get("dtype", "float32"))
    model = model_cls(config, device=device, dtype=dtype, seed=None)
    load_weights(directory / "model.safetensors", model)
    return model


def load_weights(path, model) -> None:
    """Copy every parameter of `model` from a safetensors file (names and shapes must match)."""
    tensors, _ = load_safetensors(path)
    params = model.params
    missing = [n for n in params if n not in tensors]
    unexpected = [n for n in tensors if n not in params.tensors]
    if missing or unexpected:
        raise FormatError(f"{path}: parameters do not match the model: missing {missing}, unexpected {unexpected}")
    k = params.k
    for name, t in params.items():
        value = tensors[name]
        if tuple(value.shape) != t.shape:
            raise FormatError(f"{path}: parameter {name!r} has shape {tuple(value.shape)}, the model expects {t.shape}")
        k.copy_(t.flat, k.to_device(np.ascontiguousarray(value.reshape(-1), dtype=params.dtype)))


def load_checkpoint(directory, model=None, optimizer=None, *, schedule=None,
                    loaders: Optional[Mapping[str, Any]] = None,
                    rngs: Optional[Mapping[str, np.random.Generator]] = None,
                    device: str = "cpu", dtype=None) -> Checkpoint:
    """Restore what `save_checkpoint` wrote into the given objects (each optional).

    Without `model`, one is built from config.json. Training continues at `.step`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {directory}")
    state = _read_json(directory / "state.json")
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise FormatError(f"{directory / 'state.json'}: not an {FORMAT} version {VERSION} state file")
    if model is None:
        model = load_model(directory, device=device, dtype=dtype)
    else:
        load_weights(directory / "model.safetensors", model)
    for name, value in state.get("tape", {}).items():
        setattr(model.tape, name, int(value))
    if optimizer is not None:
        if "optimizer" not in state:
            raise FormatError(f"{directory}: the checkpoint holds no optimizer state")
        arrays, _ = load_safetensors(directory / "optimizer.safetensors")
        load_optimizer_state(optimizer, _join_arrays(state["optimizer"], arrays, directory))
    if schedule is not None and state.get("schedule") is not None and hasattr(schedule, "load_state_dict"):
        schedule.load_state_dict(state["schedule"])
    for name, loader in (loaders or {}).items():
        if name not in state["data"]:
            raise FormatError(f"{directory}: no position saved for data loader {name!r}")
        loader.set_state(state["data"][name])
    for name, g in (rngs or {}).items():
        if name not in state["rng"]:
            raise FormatError(f"{directory}: no state saved for RNG {name!r}")
        g.bit_generator.state = state["rng"][name]
    return Checkpoint(directory, model, int(state["step"]), state.get("extra", {}), state)


# ---------------------------------------------------------------------- run folders

def save_run_checkpoint(out_dir, step: int, model, optimizer=None, keep_last: int = 0, **kwargs) -> Path:
    """save_checkpoint into out_dir/step_XXXXXXXX, point out_dir/latest at it, and delete
    all but the newest `keep_last` step folders (0 keeps all)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".step_*.tmp-*"):  # left by a writer that crashed
        shutil.rmtree(stale, ignore_errors=True)
    path = save_checkpoint(out_dir / f"step_{step:08d}", model, optimizer, step=step, **kwargs)
    tmp = out_dir / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(path.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / LATEST)
    _fsync_dir(out_dir)
    _written(out_dir / LATEST)
    if keep_last > 0:
        for old in sorted(out_dir.glob("step_*"))[:-keep_last]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The checkpoint out_dir/latest names, or None when there is none yet."""
    pointer = Path(out_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(out_dir) / pointer.read_text(encoding="utf-8").strip()
    if not (path / "state.json").exists():
        raise FormatError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path
