"""LoRA: low-rank adapters on a frozen model's linear layers.

    lora = nt.lora.LoRA(model, rank=16, alpha=32, targets=["q", "k", "v", "o"], dropout=0.05)
    opt = nt.optim.AdamW(lora.params, lr=2e-4)       # the adapters are the trainable set
    ...train: model.forward / model.backward as usual...
    lora.save("adapter/")                            # adapter_model.safetensors + adapter_config.json (PEFT's names)
    lora.merge()                                     # fold into the base weights; unmerge() restores them bitwise

Each adapted matrix W (OC, C) gets, per layer, A (r, C) and B (OC_part, r), and its
linear computes W x + (alpha / r) B A dropout(x) for the output rows the target names
(q, k or v of nt's fused qkv matrix, gate or up of gate_up). Adapters on one matrix are
stored stacked (`<matrix>.A` (L, G r, C), `<matrix>.B` (L, sum of OC_part, r)) so that,
without dropout, they run as one group: one gemm over C for all G of them (ops.lora_). With
dropout each has its own mask, as PEFT's modules do, so each runs alone. The base model is frozen when
the adapters attach (no grads, no weight-gradient gemms); the adapters live in their own
`Params`, one flat buffer, so the optimizer, clipping and checkpoints work on them as on a
whole model. A is initialised as PEFT does (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(C),
1/sqrt(C))), B with zeros, so an attached adapter starts as the identity.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from . import ops
from .io.common import FormatError, atomic_write_text, read_json
from .io.safetensors import load_safetensors, save_safetensors
from .tensor import Params, Tensor

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Target:
    """Where an adapter goes: rows [o0, o0 + rows) of nt matrix `matrix` (per layer, (OC, C)),
    and the module Hugging Face / PEFT call that linear (`{l}` = the layer)."""
    matrix: str
    o0: int
    rows: int
    cols: int
    module: str


def targets_of(model) -> dict[str, Target]:
    """The adapter targets a model offers, by nt's target name."""
    from .models import GPT2, Llama
    cfg = model.config
    if isinstance(model, GPT2):
        C = cfg.n_embd
        return {"qkv": Target("qkvw", 0, 3 * C, C, "transformer.h.{l}.attn.c_attn"),
                "o": Target("attprojw", 0, C, C, "transformer.h.{l}.attn.c_proj"),
                "fc": Target("fcw", 0, 4 * C, C, "transformer.h.{l}.mlp.c_fc"),
                "proj": Target("fcprojw", 0, C, 4 * C, "transformer.h.{l}.mlp.c_proj")}
    if isinstance(model, Llama):
        C, H, hs, NH, NKV = cfg.dim, cfg.ffn_hidden, cfg.hs, cfg.n_heads, cfg.n_kv_heads
        layer = "model.layers.{l}."
        return {"q": Target("qkvw", 0, NH * hs, C, layer + "self_attn.q_proj"),
                "k": Target("qkvw", NH * hs, NKV * hs, C, layer + "self_attn.k_proj"),
                "v": Target("qkvw", (NH + NKV) * hs, NKV * hs, C, layer + "self_attn.v_proj"),
                "o": Target("attn_out", 0, C, NH * hs, layer + "self_attn.o_proj"),
                "gate": Target("gate_up", 0, H, C, layer + "mlp.gate_proj"),
                "up": Target("gate_up", H, H, C, layer + "mlp.up_proj"),
                "down": Target("down", 0, C, H, layer + "mlp.down_proj")}
    raise TypeError(f"LoRA supports GPT2 and Llama models, not {type(model).__name__}")


class LoRA:
    """Adapters on `targets` of every layer of `model` (which is frozen and gets
    `model.adapters = self`). `params` holds, per adapted matrix m, `m.A` (L, G r, C) and
    `m.B` (L, sum of OC_part, r): its G targets' A and B stacked in column order
    (A(name, l) and B(name, l) are one target's)."""

    def __init__(self, model, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0,
                 seed: int = 0):
        available = targets_of(model)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not (isinstance(alpha, (int, float, np.number)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        targets = list(dict.fromkeys(targets))
        unknown = [t for t in targets if t not in available]
        if not targets or unknown:
            raise ValueError(f"LoRA targets {unknown or targets!r} match no layer of this {type(model).__name__}; "
                             f"choose from {sorted(available)}")
        if getattr(model, "adapters", None) is not None:
            raise ValueError("this model already has adapters attached (merge or detach them first)")
        quantized = [t for t in targets if available[t].matrix in model.quantized]
        if quantized:
            raise ValueError(f"LoRA targets {quantized} are kept quantised (inference only); load the model "
                             "with keep_quantized=False to train adapters")
        self.model = model
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.scale = self.alpha / self.rank
        self.targets = {t: available[t] for t in targets}
        self.n_layers = model.params[available[targets[0]].matrix].shape[0]
        self._by_matrix: dict[str, list[str]] = {}   # matrix -> its targets, by first column
        for name in sorted(self.targets, key=lambda n: self.targets[n].o0):
            self._by_matrix.setdefault(self.targets[name].matrix, []).append(name)
        layout = []
        self._slot: dict[str, tuple[int, int]] = {}   # target -> (index in its group, first row of its B)
        self._parts: dict = {}                         # matrix or target -> (G, 2) int64 (o0, rows)
        for matrix, names in self._by_matrix.items():
            tgs = [self.targets[n] for n in names]
            b0 = 0
            for i, (name, tg) in enumerate(zip(names, tgs)):
                self._slot[name] = (i, b0)
                self._parts[name] = np.array([[tg.o0, tg.rows]], dtype=np.int64)
                b0 += tg.rows
            self._parts[matrix] = np.array([[tg.o0, tg.rows] for tg in tgs], dtype=np.int64)
            layout += [(f"{matrix}.A", (self.n_layers, len(names) * self.rank, tgs[0].cols), True),
                       (f"{matrix}.B", (self.n_layers, b0, self.rank), True)]
        self.params = Params(model.params.device, model.params.dtype, layout)
        self.enabled = True
        self._merged: Optional[dict] = None   # (target, layer) -> the base rows before merge()
        self.init_weights(seed)
        model.freeze()
        model.adapters = self

    def A(self, name: str, layer: int) -> Tensor:
        """Target `name`'s A (r, C) of layer `layer`: rows of its matrix's stacked A."""
        i, _ = self._slot[name]
        stacked = self.params[f"{self.targets[name].matrix}.A"][layer]
        C = stacked.shape[1]
        return Tensor(stacked.arena, stacked.offset + i * self.rank * C, (self.rank, C))

    def B(self, name: str, layer: int) -> Tensor:
        """Target `name`'s B (OC_part, r) of layer `layer`: rows of its matrix's stacked B."""
        _, b0 = self._slot[name]
        stacked = self.params[f"{self.targets[name].matrix}.B"][layer]
        return Tensor(stacked.arena, stacked.offset + b0 * self.rank, (self.targets[name].rows, self.rank))

    def init_weights(self, seed: int = 0) -> None:
        """A ~ U(-1/sqrt(C), 1/sqrt(C)) (PEFT's Kaiming-uniform, a = sqrt(5)); B = 0. Drawn
        target by target in the order given, (L, r, C) each."""
        rng = np.random.default_rng(seed)
        host = np.zeros(self.params.numel, dtype=np.float64)
        for name, tg in self.targets.items():
            matrix = self.params[f"{tg.matrix}.A"]
            o = self.params.offsets[f"{tg.matrix}.A"]
            stacked = host[o:o + matrix.size].reshape(matrix.shape)
            i, _ = self._slot[name]
            bound = 1.0 / math.sqrt(tg.cols)
            stacked[:, i * self.rank:(i + 1) * self.rank] = rng.uniform(-bound, bound, (self.n_layers, self.rank, tg.cols))
        self.params.load_flat(host)

    # ------------------------------------------------------------------ forward

    def apply(self, tape, x, out, matrix: str, layer: Optional[int]) -> None:
        """Add the adapters on `matrix` (layer `layer`) into the linear output `out` of input x."""
        if not self.enabled or self._merged is not None or layer is None or matrix not in self._by_matrix:
            return
        if self.dropout == 0.0:   # one group: the gemms over C run once for all of the matrix's adapters
            ops.lora_(tape, out, x, *self.group(matrix, layer))
            return
        for name in self._by_matrix[matrix]:
            xa = ops.dropout(tape, x, self.dropout)   # its own mask per adapter, as PEFT's modules have
            ops.lora_(tape, out, xa, self.A(name, layer), self.B(name, layer), self.scale, self._parts[name])

    def group(self, matrix: str, layer: Optional[int]) -> Optional[tuple]:
        """(A, B, scale, parts) of all adapters on `matrix` in layer `layer`, as ops.lora_ and
        ops.glu_linear take them; None when none applies (no adapter on it, disabled, merged).
        Adapters with dropout run one by one (apply()), so they have no group."""
        if not self.enabled or self._merged is not None or layer is None or matrix not in self._by_matrix:
            return None
        if self.dropout != 0.0:
            raise ValueError(f"LoRA adapters with dropout {self.dropout} each draw their own mask: they run one "
                             "by one (apply()), not as a group")
        return (self.params[f"{matrix}.A"][layer], self.params[f"{matrix}.B"][layer], self.scale,
                self._parts[matrix])

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block (e.g. reference log-probabilities)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    # ------------------------------------------------------------------ merge

    def _delta(self, name: str, layer: int) -> np.ndarray:
        k = self.params.k
        A = np.asarray(k.to_host(self.A(name, layer).data), dtype=np.float64)
        B = np.asarray(k.to_host(self.B(name, layer).data), dtype=np.float64)
        return self.scale * (B @ A)

    def merge(self) -> None:
        """Fold every adapter into the base weights (W += scale * B @ A); the model then runs
        as a plain model and the adapters are skipped until unmerge()."""
        if self._merged is not None:
            raise RuntimeError("the adapters are already merged")
        k, base = self.params.k, self.model.params
        saved = {}
        for name, tg in self.targets.items():
            for l in range(self.n_layers):
                rows = base[tg.matrix][l].data[tg.o0:tg.o0 + tg.rows]
                old = np.array(k.to_host(rows))
                saved[name, l] = old
                k.copy_(rows, k.to_device((old + self._delta(name, l)).astype(old.dtype)))
        self._merged = saved

    def unmerge(self) -> None:
        """Undo merge(): the base rows get back exactly the values they had before it."""
        if self._merged is None:
            raise RuntimeError("the adapters are not merged")
        k, base = self.params.k, self.model.params
        for (name, l), old in self._merged.items():
            tg = self.targets[name]
            k.copy_(base[tg.matrix][l].data[tg.o0:tg.o0 + tg.rows], k.to_device(old))
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    # ------------------------------------------------------------------ files (PEFT's layout)

    def state_dict(self) -> dict[str, np.ndarray]:
        """PEFT's tensor names -> arrays in the adapters' dtype: base_model.model.<module>.lora_A.weight
        (r, C) and ...lora_B.weight (OC_part, r), one pair per adapted linear and layer."""
        k, out = self.params.k, {}
        for name, tg in self.targets.items():
            for l in range(self.n_layers):
                module = "base_model.model." + tg.module.format(l=l)
                out[f"{module}.lora_A.weight"] = np.array(k.to_host(self.A(name, l).data))
                out[f"{module}.lora_B.weight"] = np.array(k.to_host(self.B(name, l).data))
        return out

    def config(self) -> dict:
        """adapter_config.json as PEFT writes it for these adapters."""
        from .models import GPT2
        modules = sorted({tg.module.split("{l}.")[1] for tg in self.targets.values()})
        if not isinstance(self.model, GPT2):   # q_proj, ... are unique suffixes in Llama-family models
            modules = sorted(m.split(".")[-1] for m in modules)
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": modules, "bias": "none",
                "fan_in_fan_out": isinstance(self.model, GPT2),   # GPT-2's Conv1D stores (in, out)
                "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "base_model_name_or_path": None, "nt_targets": list(self.targets)}

    def save(self, directory) -> Path:
        """Write adapter_model.safetensors + adapter_config.json into `directory` (each file
        atomically), loadable by PEFT on the Hugging Face model of the same base."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(directory / ADAPTER_WEIGHTS, self.state_dict(), {"format": "pt"})
        atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(self.config(), indent=2))
        return directory

    @classmethod
    def load(cls, directory, model) -> "LoRA":
        """Attach the adapters saved in `directory` (by save() or by PEFT for this
        architecture) to `model`; every tensor's name and shape is checked."""
        directory = Path(directory)
        cfg_path = directory / ADAPTER_CONFIG
        cfg = read_json(cfg_path, what="a LoRA adapter config")
        if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
            raise FormatError(f"{cfg_path}: not a LoRA adapter config (peft_type must be 'LORA')")
        for key in ("use_dora", "use_rslora"):
            if cfg.get(key):
                raise FormatError(f"{cfg_path}: {key} adapters are not supported")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("layers_to_transform") is not None:
            raise FormatError(f"{cfg_path}: per-layer ranks, alphas or layer subsets are not supported")
        rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(alpha, (int, float)):
            raise FormatError(f"{cfg_path}: r must be an integer and lora_alpha a number, got {rank!r}, {alpha!r}")
        tensors, _ = load_safetensors(directory / ADAPTER_WEIGHTS)
        available = targets_of(model)
        targets = [t for t, tg in available.items()
                   if f"base_model.model.{tg.module.format(l=0)}.lora_A.weight" in tensors]
        if not targets:
            raise FormatError(f"{directory / ADAPTER_WEIGHTS}: no adapter matches a linear of this "
                              f"{type(model).__name__} (expected names like "
                              f"base_model.model.{next(iter(available.values())).module.format(l=0)}.lora_A.weight)")
        lora = cls(model, rank, alpha, targets, float(cfg.get("lora_dropout") or 0.0))
        want = lora.state_dict()
        extra = sorted(set(tensors) - set(want))
        missing = sorted(set(want) - set(tensors))
        if extra or missing:
            lora.detach()
            raise FormatError(f"{directory / ADAPTER_WEIGHTS}: adapter tensors do not match: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
        k = lora.params.k
        for name, tg in lora.targets.items():
            for l in range(lora.n_layers):
                module = "base_model.model." + tg.module.format(l=l)
                for part in ("A", "B"):
                    value = tensors[f"{module}.lora_{part}.weight"]
                    dest = (lora.A if part == "A" else lora.B)(name, l)
                    if tuple(value.shape) != dest.shape:
                        lora.detach()
                        raise FormatError(f"{directory / ADAPTER_WEIGHTS}: {module}.lora_{part}.weight has shape "
                                          f"{tuple(value.shape)}, expected {dest.shape}")
                    k.copy_(dest.data, k.to_device(np.ascontiguousarray(value, dtype=lora.params.dtype)))
        return lora

    def detach(self) -> None:
        """Remove the adapters from the model (unmerging first if merged); the base stays frozen."""
        if self._merged is not None:
            self.unmerge()
        self.model.adapters = None


def parse_targets(text: str) -> list[str]:
    """'q,k,v,o' -> ['q', 'k', 'v', 'o'] (the --lora-targets flag); 'all' is every target."""
    return [t.strip() for t in text.split(",") if t.strip()]


def all_targets(model) -> list[str]:
    """Every linear of the blocks (attention and MLP): what `--lora-targets all` means."""
    return list(targets_of(model))


__all__ = ["LoRA", "Target", "targets_of", "parse_targets", "all_targets"]
