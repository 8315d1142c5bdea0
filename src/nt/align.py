"""Alignment after supervised fine-tuning: DPO (preference pairs) and GRPO (rewards).

DPO (Rafailov et al. 2023), as TRL's DPOTrainer computes it: for a prompt with a chosen and
a rejected response, h = (pi_c - ref_c) - (pi_r - ref_r) on the responses' summed
log-probabilities under the policy (pi) and the frozen reference model (ref);
    sigmoid: loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
             (eps: the label smoothing of conservative DPO)
    ipo:     loss = (h - 1 / (2 beta))^2, on length-AVERAGED log-probabilities (TRL divides
             each response's summed log-prob by its token count when loss_type="ipo")
rewards = beta (pi - ref) for each response. `dpo_loss` is that formula on NumPy arrays,
with the signature of TRL 0.x's DPOTrainer.dpo_loss (TRL 1.x folds the loss into
_compute_loss, drops label smoothing from "sigmoid" and logs IPO's rewards from the summed
log-ratios; tests/align/test_trl.py compares); `nt.ops.dpo` is the op that backpropagates
it through the tape.

GRPO (Shao et al. 2024, DeepSeekMath; as in DeepSeek-R1): G completions per prompt are
sampled, scored, and each completion's advantage is its reward normalised within its
group, A = (r - mean) / (std + 1e-4) (TRL's scale_rewards="group": the Bessel-corrected std,
as torch.std computes it). Per completion token, with ratio = exp(logp - old_logp),
    l = -(min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) - beta KL),  KL = exp(ref - logp) - (ref - logp) - 1
and the loss is the sum over every completion token of the batch divided by their count
(TRL's loss_type="bnpo", the token-level normalisation of DAPO; "dapo" is the same on one
process). `nt.ops.grpo` is that op.

The training loops (train/dpo.py, train/grpo.py) are batch sources (PairBatches,
GroupSampler) and loss functions (DPOLoss, GRPOLoss) for nt.train_utils.train, which
supplies the optimizer, schedule, clipping, checkpoints and exact resume. Reference
log-probabilities come from the LoRA base with the adapters switched off, or from a frozen
copy of the starting model (Reference). docs/alignment.md has the commands and measured runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import ops
from .optim import AdamW
from .sft import Render, renderer_for
from .tensor import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo")
ADVANTAGE_EPS = 1e-4   # TRL's: keeps a group of equal rewards at advantage 0


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log(sigmoid(x)) without overflow: -log(1 + exp(-x))."""
    return -np.logaddexp(0.0, -x)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from the responses'
    log-probabilities (B,) under the policy and the reference, as TRL's DPOTrainer.dpo_loss.

    The log-probs are used as given: summed for "sigmoid", averaged over each response's
    tokens for "ipo" (as TRL passes them). Rewards are beta * (policy - reference)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in
              (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"dpo_loss: the four log-prob arrays must be (B,) of the same length, "
                         f"got shapes {[a.shape for a in arrays]}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be positive, got {beta}")
    pc, pr, rc, rr = arrays
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
    return losses, beta * (pc - rc), beta * (pr - rr)


def group_advantages(rewards, group_size: int, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """(r - mean) / (std + eps) within each group of `group_size` consecutive rewards
    (the G completions of one prompt); std is Bessel-corrected, as TRL's torch.std."""
    r = np.asarray(rewards, dtype=np.float64)
    if group_size < 2:
        raise ValueError(f"GRPO needs G >= 2 completions per prompt to compare, got G = {group_size}")
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"rewards must be a flat array whose length is a multiple of G = {group_size}, "
                         f"got shape {r.shape}")
    groups = r.reshape(-1, group_size)
    adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


# ---------------------------------------------------------------------- shared by both loops

def encode(tokenizer, text: str) -> np.ndarray:
    """The token ids of `text` as an int32 array (nt's tokenizers return lists)."""
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def set_help(p: argparse.ArgumentParser, flag: str, text: str) -> None:
    """Reword a shared flag's help where this script gives it its own meaning."""
    for action in p._actions:
        if flag in action.option_strings:
            action.help = text
            return
    raise KeyError(flag)


def save_demo_base(model, path) -> Path:
    """Write a demo's starting model as an nt checkpoint folder (what --base names), once:
    a resumed run finds it there."""
    from .io import save_checkpoint
    path = Path(path)
    return path if (path / "state.json").is_file() else save_checkpoint(path, model)


def reference_for(model, extra: dict):
    """The reference of a run prepared by nt.train_utils.prepare_finetune: the base with the
    LoRA adapters switched off, or (full fine-tuning) a frozen second load of the base."""
    if model.adapters is not None:
        return Reference(model, lora=model.adapters)
    from .train_utils import load_pretrained
    base = load_pretrained(extra["finetune"]["base"], device=model.params.device, dtype=model.params.dtype).model
    return Reference(model, frozen_copy=base.freeze())


def frozen_copy(model):
    """A second model with `model`'s weights, every parameter frozen: a full-weight run's
    reference (its own tape and memory; the LoRA base needs none)."""
    copy = type(model)(model.config, device=model.params.device, dtype=model.params.dtype, seed=None)
    copy.load_flat(model.params.to_flat())
    return copy.freeze()


class Reference:
    """The reference policy's log-probabilities: the policy itself with its LoRA adapters
    switched off (no second model in memory), or a frozen copy of the starting model on its
    own tape. Computed without recording, in eval mode."""

    def __init__(self, policy, lora=None, frozen_copy=None):
        if (lora is None) == (frozen_copy is None):
            raise ValueError("a reference is the LoRA base or a frozen copy: give exactly one")
        self.policy, self.lora, self.copy = policy, lora, frozen_copy

    def token_logprobs(self, idx: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        if self.lora is not None:
            with self.lora.disabled():
                return inference_logprobs(self.policy, idx, targets, temperature)
        return inference_logprobs(self.copy, idx, targets, temperature)


def inference_logprobs(model, idx: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log p(target) (B, T) as float64 NumPy (0 where the target is -1), from logits / temperature,
    in eval mode without recording; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        logits = model.forward_inference(idx)
        if temperature != 1.0:
            logits = ops.scale(model.tape, logits, 1.0 / temperature)
        lp = ops.token_logprobs(model.tape, logits, targets, model.config.vocab_size)
        return np.array(model.tape.k.to_host(lp.data), dtype=np.float64)
    finally:
        model.train(was_training)


def _host(model, x: Tensor) -> np.ndarray:
    """A float64 copy of a tensor (the arena is overwritten by the next forward)."""
    return np.array(model.tape.k.to_host(x.data), dtype=np.float64)


def resumed_step(resume) -> Optional[int]:
    """The step a checkpoint continues from (None: a new run)."""
    if resume is None:
        return None
    from .io.checkpoint import checkpoint_state
    return checkpoint_state(resume)["step"]


class MetricsLog:
    """metrics.jsonl in the run folder: per optimizer step, the mean of each metric over its
    micro-batches (TRL's names), plus evaluation entries. Resuming at step k drops what
    came after k, so the file reads like one run."""

    def __init__(self, out_dir, micro_batches: int, resume_step: Optional[int] = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.micro_batches = micro_batches
        self.step = resume_step or 0
        self.pending: list[dict] = []
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line + "\n" for line in self.path.read_text().splitlines()
                    if json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(kept))

    def add(self, values: dict) -> None:
        """One micro-batch's metrics; a step's mean is written once all its micro-batches are in."""
        self.pending.append(values)
        if len(self.pending) == self.micro_batches:
            self.step += 1
            mean = {key: float(np.mean([v[key] for v in self.pending])) for key in self.pending[0]}
            self.write(step=self.step, **mean)
            self.pending = []

    def write(self, **entry) -> None:
        """Append one entry (a step's metrics, or an evaluation's)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        """Every entry written so far."""
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def plot(self, keys: Sequence[str], name: str) -> Optional[Path]:
        """`name`.png of the metrics `keys` against the step, when matplotlib is installed."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        entries = self.entries()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(e["step"], e[key]) for e in entries if key in e]
            if pts:
                ax.plot(*zip(*pts), "o-" if key.startswith("eval/") else "-", label=key, markersize=3)
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        out = self.path.parent / f"{name}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


class BadRecord(ValueError):
    """A JSONL record that cannot be used; the message names the file and line."""


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; invalid JSON or a non-object is a
    BadRecord naming the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecord(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise BadRecord(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
            out.append((n, record))
    if not out:
        raise BadRecord(f"{path}: no records")
    return out


def _messages(value, where: str, field: str) -> list[dict]:
    """`value` checked to be chat messages (a non-empty list of role/content strings)."""
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                      and isinstance(m.get("content"), str) for m in value)):
        raise BadRecord(f"{where}: {field!r} must be text or a non-empty list of "
                        '{"role": ..., "content": ...} messages')
    return value


def prompt_text(record: dict, where: str, render: Render) -> str:
    """The prompt of a record as text: the string itself, or its messages rendered with the
    chat template (render(messages, add_generation_prompt)) up to the opening of the
    assistant's turn."""
    if "prompt" not in record:
        raise BadRecord(f"{where}: missing field 'prompt'")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRecord(f"{where}: 'prompt' is empty")
        return prompt
    return render(_messages(prompt, where, "prompt"), True)


# ---------------------------------------------------------------------- DPO data

@dataclasses.dataclass
class PreferencePair:
    """One tokenized preference: the prompt's ids and the two responses' ids."""
    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    line: int


def response_text(record: dict, field: str, where: str, render: Render) -> str:
    """`chosen` / `rejected` as text: a continuation string, or assistant messages rendered
    after the prompt (their content and the template's end-of-turn marker)."""
    if field not in record:
        raise BadRecord(f"{where}: missing field {field!r}")
    value = record[field]
    if isinstance(value, str):
        text = value
    else:
        messages = _messages(value, where, field)
        if any(m["role"] != "assistant" for m in messages):
            raise BadRecord(f"{where}: {field!r} messages must all be the assistant's")
        if not isinstance(record["prompt"], list):
            raise BadRecord(f"{where}: {field!r} is messages, so 'prompt' must be messages too")
        before = render(record["prompt"], True)
        full = render(record["prompt"] + messages, False)
        if not full.startswith(before):
            raise BadRecord(f"{where}: the chat template does not render the prompt as a prefix of the answer")
        text = full[len(before):]
    if not text:
        raise BadRecord(f"{where}: {field!r} is empty: a preference needs two non-empty responses")
    return text


def read_preferences(path, tokenizer, max_length: int) -> list[PreferencePair]:
    """Tokenized pairs from a JSONL file of {"prompt", "chosen", "rejected"} records, chat
    messages rendered with the tokenizer's template (else ChatML, as nt.sft). A record
    longer than max_length tokens (prompt + response) has its responses cut to fit; a
    prompt that leaves no room, a missing or empty field is a BadRecord naming the line."""
    render = renderer_for(tokenizer)
    pairs = []
    for line, record in read_jsonl(path):
        where = f"{path} line {line}"
        prompt = encode(tokenizer, prompt_text(record, where, render))
        chosen = encode(tokenizer, response_text(record, "chosen", where, render))
        rejected = encode(tokenizer, response_text(record, "rejected", where, render))
        room = max_length - len(prompt)
        if room < 1:
            raise BadRecord(f"{where}: the prompt has {len(prompt)} tokens, leaving no room for a response "
                            f"in {max_length}")
        pairs.append(PreferencePair(prompt, chosen[:room], rejected[:room], line))
    return pairs


def response_rows(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(idx, targets), one row per prompt + response, right-padded: targets are the next
    tokens on the response and -1 on the prompt and the padding."""
    rows = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows) - 1
    idx = np.zeros((len(rows), T), dtype=np.int32)
    targets = np.full((len(rows), T), -1, dtype=np.int32)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        idx[i, :len(row) - 1] = row[:-1]
        # position t predicts token t + 1: the response is predicted from the prompt's last position on
        targets[i, len(prompt) - 1:len(row) - 1] = row[len(prompt):]
    return idx, targets


def pair_batch(pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray]:
    """(idx, targets) of 2B rows: the chosen responses, then the rejected ones, each after its prompt."""
    prompts = [p.prompt for p in pairs]
    return response_rows(prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])


class PairBatches:
    """A batch source of B preference pairs at a time, in a seeded order reshuffled each
    epoch; state() / set_state() give its position (exact resume)."""

    def __init__(self, pairs: Sequence[PreferencePair], B: int, seed: int = 0):
        if not 0 < B <= len(pairs):
            raise ValueError(f"a batch of {B} pairs needs 1 <= B <= {len(pairs)} (the pairs available)")
        self.pairs, self.B, self.seed = list(pairs), B, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position + self.B > len(self.pairs):
            self.epoch, self.position = self.epoch + 1, 0
        chosen = self._order()[self.position:self.position + self.B]
        self.position += self.B
        return pair_batch([self.pairs[i] for i in chosen])

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and isinstance(position, int) and 0 <= position <= len(self.pairs)):
            raise ValueError(f"not a position of {len(self.pairs)} pairs: {state!r}")
        self.epoch, self.position = epoch, position


class DPOLoss:
    """The loss function train() calls: reference log-probs once per batch (no recording),
    the policy's with recording, then ops.dpo. Training batches' metrics go to `metrics`
    under TRL's names (loss, rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected)."""

    def __init__(self, reference: Reference, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", metrics: Optional[MetricsLog] = None):
        self.reference, self.metrics = reference, metrics
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.last: dict = {}

    def __call__(self, model, batch) -> Tensor:
        idx, targets = batch
        ref = self.reference.token_logprobs(idx, targets).sum(1)
        logits, _ = model.forward(idx)
        sums, counts = ops.sequence_logprobs(model.tape, logits, targets, model.config.vocab_size)
        ipo = self.loss_type == "ipo"
        loss = ops.dpo(model.tape, sums, ref, self.beta, self.label_smoothing, self.loss_type,
                       counts if ipo else None)
        policy = _host(model, sums)
        if ipo:   # the metrics see what the loss saw: averaged log-probs
            policy, ref = policy / counts, ref / counts
        B = len(policy) // 2
        losses, chosen, rejected = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.beta,
                                            self.label_smoothing, self.loss_type)
        self.last = {"loss": float(losses.mean()), "rewards/chosen": float(chosen.mean()),
                     "rewards/rejected": float(rejected.mean()),
                     "rewards/accuracies": float(np.mean(chosen > rejected)),
                     "rewards/margins": float(np.mean(chosen - rejected)),
                     "logps/chosen": float(policy[:B].mean()), "logps/rejected": float(policy[B:].mean())}
        if self.metrics is not None and model.training:
            self.metrics.add(self.last)
        return loss


def dpo_evaluate(model, loss_fn: DPOLoss, pairs: Sequence[PreferencePair], B: int) -> dict:
    """Mean loss, reward accuracy and margin over `pairs` (batches of B), in eval mode."""
    sums = {"loss": 0.0, "rewards/accuracies": 0.0, "rewards/margins": 0.0}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(pairs), B):
            chunk = pairs[i:i + B]
            loss_fn(model, pair_batch(chunk))
            for key in sums:
                sums[key] += loss_fn.last[key] * len(chunk)
    finally:
        model.train(was_training)
    return {key: value / len(pairs) for key, value in sums.items()}


def synthetic_preferences(n: int, seed: int = 0) -> list[dict]:
    """A preference set a small model learns in seconds: the prompt asks to greet or to
    take leave of a random name; the chosen answer is the fixed reply that fits ("hello"
    or "goodbye" and the name), the rejected one the other reply. Both replies are equally
    likely for both requests until the model reads the request."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for _ in range(n):
        name = "".join(rng.choice(letters, int(rng.integers(3, 7))))
        greet = bool(rng.integers(2))
        hello, goodbye = f" hello, {name}!\n", f" goodbye, {name}!\n"
        out.append({"prompt": f"{'greet' if greet else 'leave'} {name}:",
                    "chosen": hello if greet else goodbye, "rejected": goodbye if greet else hello})
    return out


def write_jsonl(path, records: Sequence[dict]) -> Path:
    """Write records one JSON object per line (a demo's data set, for the user to read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- GRPO

RewardFn = Callable[..., Sequence[float]]   # (prompts, completions, **record fields) -> one reward each


@dataclasses.dataclass
class Prompt:
    """A tokenized GRPO prompt: its ids (chat messages rendered with the template), the prompt
    as the record has it (text or messages: what the reward functions get, as in TRL), the
    record's other fields (passed to the reward functions by name) and where it came from."""
    ids: np.ndarray
    prompt: object
    fields: dict
    where: str


def _prompt(record: dict, where: str, tokenizer, render: Render) -> Prompt:
    """One record as a Prompt (errors name `where`)."""
    ids = encode(tokenizer, prompt_text(record, where, render))
    return Prompt(ids, record["prompt"], {k: v for k, v in record.items() if k != "prompt"}, where)


def read_prompts(path, tokenizer) -> list[Prompt]:
    """GRPO prompts from JSONL: {"prompt": text or messages, ...any fields the rewards read}."""
    render = renderer_for(tokenizer)
    return [_prompt(record, f"{path} line {line}", tokenizer, render) for line, record in read_jsonl(path)]


def prompts_from_records(records: Sequence[dict], tokenizer, name: str = "prompts") -> list[Prompt]:
    """Prompts from in-memory records (the demo task), named `name` record i in errors."""
    render = renderer_for(tokenizer)
    return [_prompt(record, f"{name} record {i}", tokenizer, render) for i, record in enumerate(records)]


def score(reward_fns: Sequence[RewardFn], weights: Sequence[float], prompts: Sequence[Prompt],
          completions: Sequence[str], G: int) -> tuple[np.ndarray, dict]:
    """The weighted sum of the reward functions for each completion (prompt i's G completions
    are rows i*G..i*G+G-1), and each function's rewards by name. A reward function must
    return one finite number per completion: anything else is a ValueError naming the
    function, the prompt's record and the completion."""
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(reward_fns)} reward functions but {len(weights)} weights")
    prompt_values = [p.prompt for p in prompts for _ in range(G)]
    fields = {key: [p.fields.get(key) for p in prompts for _ in range(G)] for key in prompts[0].fields}
    total = np.zeros(len(completions))
    by_name = {}
    for fn, weight in zip(reward_fns, weights):
        name = getattr(fn, "__name__", repr(fn))
        values = fn(prompt_values, list(completions), **fields)
        if not hasattr(values, "__len__") or len(values) != len(completions):
            raise ValueError(f"reward function {name} returned {getattr(values, '__len__', None) and len(values)} "
                             f"values for {len(completions)} completions")
        rewards = np.empty(len(completions))
        for i, v in enumerate(values):
            where = f"reward function {name}: completion {i % G} of {prompts[i // G].where}"
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"{where}: the reward {v!r} is not a number")
            if not math.isfinite(float(v)):
                raise ValueError(f"{where}: the reward is {float(v)}, not a finite number")
            rewards[i] = float(v)
        by_name[name] = rewards
        total += weight * rewards
    return total, by_name


def sample_completions(model, prompts: Sequence[Prompt], G: int, max_new_tokens: int, temperature: float,
                       seed: int) -> np.ndarray:
    """(len(prompts) * G, max_new_tokens) completion ids, prompt i's G completions in rows
    i*G..i*G+G-1. Prompts of equal length are sampled together in one generate() call
    (the KV cache takes a batch of equal-length prompts), so a group is one batch."""
    out = np.empty((len(prompts) * G, max_new_tokens), dtype=np.int32)
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p.ids), []).append(i)
    for k, (length, which) in enumerate(sorted(by_length.items())):
        rows = np.repeat(np.stack([prompts[i].ids for i in which]), G, axis=0)
        sampled = model.generate(rows, max_new_tokens, temperature=temperature,
                                 seed=int(np.random.default_rng([seed, k]).integers(2 ** 31)))
        for j, i in enumerate(which):
            out[i * G:(i + 1) * G] = sampled[j * G:(j + 1) * G, length:]
    return out


def completion_lengths(completions: np.ndarray, eos_id: int) -> np.ndarray:
    """Tokens of each completion row that count: up to and including the first EOS, else all."""
    lengths = np.full(len(completions), completions.shape[1])
    for r, row in enumerate(completions):
        hits = np.flatnonzero(row == eos_id)
        if hits.size:
            lengths[r] = hits[0] + 1
    return lengths


def completion_texts(tokenizer, completions: np.ndarray, lengths: np.ndarray, eos_id: int) -> list[str]:
    """The completions' text, without the EOS token (what the reward functions read)."""
    return [tokenizer.decode(row[:n - int(row[n - 1] == eos_id)]) for row, n in zip(completions, lengths)]


def greedy_reward(model, tokenizer, prompts: Sequence[Prompt], reward_fns: Sequence[RewardFn],
                  weights: Sequence[float], max_new_tokens: int, eos_id: int) -> tuple[float, dict]:
    """The mean reward (and each function's) of the greedy completion of every prompt."""
    completions = sample_completions(model, prompts, 1, max_new_tokens, 0.0, 0)
    texts = completion_texts(tokenizer, completions, completion_lengths(completions, eos_id), eos_id)
    total, by_name = score(reward_fns, weights, prompts, texts, 1)
    return float(total.mean()), {name: float(v.mean()) for name, v in by_name.items()}


@dataclasses.dataclass
class GroupBatch:
    """One GRPO batch: B prompts x G completions as training rows, with what the loss needs."""
    idx: np.ndarray          # (B*G, T) prompt + completion ids (padding 0)
    targets: np.ndarray      # (B*G, T) the completion's next tokens, -1 elsewhere
    mask: np.ndarray         # (B*G, T) 1.0 on completion tokens up to and including EOS
    old: np.ndarray          # (B*G, T) log-probs of the policy that sampled
    ref: Optional[np.ndarray]  # (B*G, T) the reference's, None when beta is 0
    advantages: np.ndarray   # (B*G,)
    rewards: np.ndarray      # (B*G,) the weighted sum
    by_name: dict            # reward function name -> (B*G,)
    completions: list        # the completions' text (up to EOS)


class GroupSampler:
    """The GRPO batch source: B prompts (seeded order, reshuffled each epoch), G completions
    each sampled from the current policy with the KV cache, prompts of equal length in one
    generate() call, so a group is always sampled in one batch. Completions end at the
    first `eos_id` (included in the loss) or after max_new_tokens. The old-policy
    log-probs come from a forward pass right after sampling, with the same weights (the
    policy that sampled), at the sampling temperature; the reference's from `reference`.
    Each sampled batch is handed out `iterations` times (TRL's num_iterations, PPO's
    epochs): after the first optimizer step on it the policy has moved, the ratio to the old
    log-probs is no longer 1 and the clip acts. Sampling seeds derive from (seed, batches
    sampled), so state() resumes exactly, at the boundaries between sampled batches."""

    def __init__(self, model, prompts: Sequence[Prompt], tokenizer, reward_fns: Sequence[RewardFn],
                 weights: Sequence[float], G: int, B: int, max_new_tokens: int, eos_id: int,
                 temperature: float = 1.0, reference: Optional[Reference] = None, seed: int = 0,
                 iterations: int = 1):
        if G < 2:
            raise ValueError(f"GRPO needs G >= 2 completions per prompt to compare, got G = {G}")
        if not 0 < B <= len(prompts):
            raise ValueError(f"a batch of {B} prompts needs 1 <= B <= {len(prompts)} (the prompts available)")
        if not temperature > 0:
            raise ValueError(f"GRPO samples: temperature must be > 0, got {temperature}")
        if iterations < 1:
            raise ValueError(f"each sampled batch needs at least one iteration, got {iterations}")
        longest = max(len(p.ids) for p in prompts) + max_new_tokens
        if longest > model.config.block_size:
            raise ValueError(f"prompt + {max_new_tokens} new tokens = {longest} exceeds the model's block_size "
                             f"{model.config.block_size}")
        self.model, self.prompts, self.tokenizer = model, list(prompts), tokenizer
        self.reward_fns, self.weights = list(reward_fns), list(weights)
        self.G, self.B, self.max_new_tokens, self.eos_id = G, B, max_new_tokens, eos_id
        self.temperature, self.reference, self.seed, self.iterations = temperature, reference, seed, iterations
        self.epoch, self.position, self.drawn = 0, 0, 0
        self.batch: Optional[GroupBatch] = None   # the last sampled batch, handed out `uses` times so far
        self.uses = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next_batch(self) -> GroupBatch:
        if self.batch is None or self.uses == self.iterations:
            self.batch, self.uses = self._sample(), 0
        self.uses += 1
        return self.batch

    def _sample(self) -> GroupBatch:
        if self.position + self.B > len(self.prompts):
            self.epoch, self.position = self.epoch + 1, 0
        prompts = [self.prompts[i] for i in self._order()[self.position:self.position + self.B]]
        self.position += self.B
        completion = sample_completions(self.model, prompts, self.G, self.max_new_tokens, self.temperature,
                                        int(np.random.default_rng([self.seed, self.drawn]).integers(2 ** 31)))
        self.drawn += 1
        G, N = self.G, len(prompts) * self.G
        ends = completion_lengths(completion, self.eos_id)
        texts = completion_texts(self.tokenizer, completion, ends, self.eos_id)
        rewards, by_name = score(self.reward_fns, self.weights, prompts, texts, G)
        advantages = group_advantages(rewards, G)

        T = max(len(p.ids) for p in prompts) + self.max_new_tokens - 1
        idx = np.zeros((N, T), dtype=np.int32)
        targets = np.full((N, T), -1, dtype=np.int32)
        for r in range(N):
            p = prompts[r // G].ids
            row = np.concatenate([p, completion[r]])
            idx[r, :len(row) - 1] = row[:-1]
            targets[r, len(p) - 1:len(p) - 1 + ends[r]] = completion[r, :ends[r]]
        old = inference_logprobs(self.model, idx, targets, self.temperature)
        ref = self.reference.token_logprobs(idx, targets, self.temperature) if self.reference is not None else None
        return GroupBatch(idx, targets, (targets >= 0).astype(np.float64), old, ref, advantages, rewards, by_name,
                          texts)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "drawn": self.drawn, "uses": self.uses}

    def set_state(self, state: dict) -> None:
        """Continue after a saved state. Only a state between sampled batches can be resumed:
        the batch being reused came from weights that are gone."""
        values = [state.get(k) for k in ("epoch", "position", "drawn", "uses")]
        if not (all(isinstance(v, int) and v >= 0 for v in values) and values[1] <= len(self.prompts)):
            raise ValueError(f"not a position of {len(self.prompts)} prompts: {state!r}")
        if values[3] not in (0, self.iterations):
            raise ValueError(f"the state was saved after {values[3]} of the {self.iterations} iterations on one "
                             "sampled batch, which cannot be sampled again: resume from a checkpoint at a "
                             "multiple of the iterations")
        self.epoch, self.position, self.drawn = values[:3]
        self.batch, self.uses = None, 0


class GRPOLoss:
    """The loss function train() calls on a GroupBatch: the policy's per-token log-probs
    (recording, logits / temperature as at sampling), then ops.grpo. Training batches'
    metrics go to `metrics` under TRL's names (loss, reward, reward_std, rewards/<fn>/mean,
    kl, clip_ratio/region_mean, completions/mean_length)."""

    def __init__(self, beta: float = 0.04, epsilon: float = 0.2, epsilon_high: Optional[float] = None,
                 temperature: float = 1.0, metrics: Optional[MetricsLog] = None):
        self.beta, self.epsilon = beta, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.temperature, self.metrics = temperature, metrics
        self.last: dict = {}

    def __call__(self, model, batch: GroupBatch) -> Tensor:
        t = model.tape
        logits, _ = model.forward(batch.idx)
        if self.temperature != 1.0:
            logits = ops.scale(t, logits, 1.0 / self.temperature)
        lp = ops.token_logprobs(t, logits, batch.targets, model.config.vocab_size)
        loss = ops.grpo(t, lp, batch.old, batch.ref, batch.advantages, batch.mask, self.beta, self.epsilon,
                        self.epsilon_high)
        now, mask = _host(model, lp), batch.mask
        tokens = mask.sum()
        ratio = np.exp(now - batch.old)
        clipped = ((ratio < 1 - self.epsilon) & (batch.advantages[:, None] < 0)) | \
                  ((ratio > 1 + self.epsilon_high) & (batch.advantages[:, None] > 0))
        self.last = {"loss": float(_host(model, loss)[0]), "reward": float(batch.rewards.mean()),
                     "reward_std": float(batch.rewards.std(ddof=1)),
                     "clip_ratio/region_mean": float((clipped * mask).sum() / tokens),
                     "completions/mean_length": float(tokens / len(mask))}
        if batch.ref is not None:
            delta = batch.ref - now
            self.last["kl"] = float(((np.exp(delta) - delta - 1) * mask).sum() / tokens)
        for name, values in batch.by_name.items():
            self.last[f"rewards/{name}/mean"] = float(values.mean())
        if self.metrics is not None and model.training:
            self.metrics.add(self.last)
        return loss


def load_reward(spec: str) -> RewardFn:
    """A reward function named 'module:function' or 'path/to/file.py:function'."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"a reward function is named 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if loader is None or not Path(module_name).is_file():
            raise ValueError(f"reward file {module_name} not found")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec}: {module_name} has no function {attr!r}")
    return fn


def supervised_warmup(model, examples: Sequence[tuple[np.ndarray, np.ndarray]], steps: int, B: int,
                      lr: float, seed: int = 0) -> list[float]:
    """A short supervised start: `steps` AdamW steps of next-token cross-entropy on the
    completion tokens of (prompt ids, completion ids) examples (B drawn at random per step),
    so a fresh model knows the task's format before GRPO. Returns the losses."""
    rng = np.random.default_rng(seed)
    optimizer = AdamW(model.trainable_params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        batch = [examples[i] for i in rng.integers(0, len(examples), B)]
        idx, targets = response_rows([p for p, _ in batch], [c for _, c in batch])
        model.zero_grad()
        _, loss = model.forward(idx, targets)
        model.backward()
        optimizer.step()
        losses.append(float(model.tape.k.to_host(loss.data)[0]))
    return losses


# ---------------------------------------------------------------------- the GRPO demo task

def sum_task(seed: int = 0) -> list[dict]:
    """Every "a+b=" with digits a, b and its answer, in a seeded order: the demo's prompts."""
    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_) -> list[float]:
    """1 when the completion (up to the end of line) is exactly the answer, else 0."""
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def digits_only(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """1 when the completion is one or two digits (the answer's format), else 0."""
    return [1.0 if 0 < len(c) <= 2 and c.isdigit() else 0.0 for c in completions]
