"""What every training script shares: the common flags, data and tokenizer, run folders
with checkpoints and resume, the loss log (JSONL + PNG curve), and one training loop that
pretraining, supervised fine-tuning, distillation and preference tuning all run.

Pretraining (train/train_gpt2.py, train/train_llama.py):

    p = argparse.ArgumentParser(); add_training_args(p); ...model flags...
    args = p.parse_args()
    dtype, data, resume = prepare_run(args)    # token arrays + tokenizer; checkpoint to resume or None
    model = load_model(resume) if resume else MyModel(...)   # resuming: weights from the checkpoint
    pretrain(args, model, data, resume)        # loaders, unigram baseline, train(), a sample

Anything else calls the loop itself:

    train(args, model, source, loss_fn, evaluate=..., resume=..., extra=...)

Its extension points:
- `source`, the batch source: `next_batch()` returns the next batch (any object: a pair
  (idx, targets), a dict of arrays, ...), `state()` / `set_state(state)` give and restore
  its position as a JSON-able dict (saved in every checkpoint: resume is exact).
  `nt.data.DataLoader` (token streams) and `nt.sft.ChatBatches` (chats) are sources.
- `loss_fn(model, batch) -> Tensor`: runs the forward(s) on `model.tape`, recording, and
  returns the (1,) loss tensor to backpropagate (default `lm_loss`: the model's own
  next-token cross-entropy, targets -1 ignored). Compose nt ops for other losses
  (distillation: alpha * kl_div + (1 - alpha) * cross_entropy); a frozen second model
  (teacher, reference) runs on its own tape with `model.forward_inference(idx)`.
- The trainable parameters are `model.trainable_params`: the model's own (its trainable
  part after `model.freeze(...)`), or the LoRA adapters when `nt.lora.LoRA` is attached;
  the optimizer, clipping, loss scaling and checkpoints take them. A LoRA run's
  checkpoints store the adapters (trainable.safetensors), not the frozen base: the caller
  rebuilds the base and attaches the adapters before calling train(resume=...), and keeps
  what it needs for that in `extra` (read back with `nt.io.checkpoint.checkpoint_state(path)["extra"]`).
- `evaluate() -> float`: the validation loss, called at step 0, every --eval-every steps
  and at the end (`eval_loss(model, batches, loss_fn)` averages a loss in eval mode).
- `extra`: JSON-able values stored in every checkpoint's state.json (key "scaler" is the loop's).

`args` needs the flags of add_run_args and add_loop_args. A script that adapts a
pretrained model (finetune.py; a preference-tuning script alike) takes add_finetune_args
and calls prepare_finetune(args, resume, dtype) -> (model with LoRA attached or parts
frozen, tokenizer, extra for train()); load_pretrained(path) alone reads a run folder,
checkpoint, GGUF file or Hugging Face folder with its tokenizer.

The loop: --optimizer with warmup + cosine decay, --grad-accum micro-batches
(`accumulate_grads`), --loss-scale, clipping inside the optimizer's update (clip_scale +
step(grad_scale=, zero_grad=True): the factor made beside the grads, which the update
leaves zero), log.jsonl + loss.png (`LossLog`), a progress bar, checkpoints every
--checkpoint-every steps (`save_run_checkpoint`), and exact resume: a stopped-and-resumed
run logs the same losses bit for bit. Under `mpiexec -n N` it trains data parallel
(nt.dist: grads averaged over ranks, --zero 1 shards the optimizer state; rank 0 logs and
checkpoints; docs/distributed.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np

from . import dist
from .data import (BYTE_VOCAB, DEFAULT_BPE_VOCAB, DataLoader, builtin_corpus, builtin_tokenizer,
                   byte_tokens_to_text, encode_text, text_to_byte_tokens)
from .io import (latest_checkpoint, load_checkpoint, load_model, load_weights, read_llmc_tokens, resolve_checkpoint,
                 save_run_checkpoint)
from .io.checkpoint import LATEST, MODEL_WEIGHTS, checkpoint_state
from .lora import LoRA, all_targets, parse_targets
from .optim import OPTIMIZERS, CosineSchedule, GradScaler, make_optimizer, scale_grads
from .tensor import Tensor
from .tokenizer import BPE, ByteTokenizer


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The flags every pretraining script takes: data, run folder, optimisation, sampling."""
    add_data_args(p)
    add_run_args(p)
    add_loop_args(p)
    add_sample_args(p)


def add_loop_args(p: argparse.ArgumentParser) -> None:
    """The flags train() reads: batch shape, steps, schedule, optimizer, evaluation, precision."""
    p.add_argument("-B", "--batch-size", type=int, default=16, help="sequences per micro-batch (default 16)")
    p.add_argument("-T", "--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps in the whole run (default 700)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps before the cosine decay (default 20)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay of matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this (0: no clipping; default 1)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
                   help="adamw (default), adam, sgd (momentum 0.9) or chuck (AdamW that watches the loss)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of -B sequences per optimizer step (effective batch: grad_accum * B)")
    p.add_argument("--loss-scale", action="store_true",
                   help="dynamic loss scaling with a NaN/Inf guard: steps with non-finite grads are skipped")
    p.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps and at the end (0: never)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation (default 8)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and activation precision")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: mixed precision on CUDA (bf16 matmul operands, float32 accumulation and master "
                        "weights; docs/cuda.md); fp32 (default): every op in --dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and sampling")
    p.add_argument("--zero", type=int, choices=[0, 1], default=0,
                   help="under mpiexec: 1 shards the optimizer state over the ranks (ZeRO-1; default 0)")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    """The flags of the sample printed at the end of a run."""
    p.add_argument("--sample-tokens", type=int, default=100, help="tokens to sample at the end (0: no sample)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--prompt", default="The", help="text the sample continues")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="*", default=None,
                   help="training text files (a BPE is trained on them) or llm.c token shards (.bin); "
                        "default: the built-in corpus")
    p.add_argument("--val-data", nargs="*", default=None, help="validation files (default: last 5%% of --data)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer folder (vocab.json + merges.txt), or 'bytes' for bytes as tokens; "
                        "default: a BPE trained on the text (cached for the built-in corpus)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE size to train (default {DEFAULT_BPE_VOCAB}), or the vocabulary of .bin shards "
                        "(default: the tokenizer's, else 50257)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="out", help="run folder: checkpoints, log.jsonl, loss.png, tokenizer/")
    p.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' (the newest in --out-dir)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=int, default=3, help="keep only the newest N checkpoints (0: all)")


@dataclasses.dataclass
class Data:
    """Training data ready for DataLoader: lists of token arrays (or shard paths)."""
    train: list
    val: list
    vocab_size: int
    tokenizer: Optional[BPE]  # None: bytes as tokens, or shards without a tokenizer
    is_bytes: bool

    def encode(self, text: str) -> np.ndarray:
        if self.is_bytes:
            return text_to_byte_tokens(text)
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def decode(self, ids) -> Optional[str]:
        if self.is_bytes:
            return byte_tokens_to_text(ids)
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None


def _tokenizer_for(args, text: Optional[str], out_dir: Path) -> Optional[BPE]:
    """The --tokenizer folder; else the run folder's (when resuming); else a new BPE on text."""
    if args.tokenizer not in (None, "bytes"):
        return BPE.load(args.tokenizer)
    saved = out_dir / "tokenizer"
    if args.resume and (saved / "merges.txt").exists():
        return BPE.load(saved)
    if text is None:
        return None
    print(f"training a BPE of {args.vocab_size or DEFAULT_BPE_VOCAB} tokens on {len(text):,} characters...")
    return BPE.train(text, args.vocab_size or DEFAULT_BPE_VOCAB)


def load_data(args) -> Data:
    """Tokens for training from the data options; the tokenizer is saved in --out-dir."""
    out_dir = Path(args.out_dir)
    is_bytes = args.tokenizer == "bytes"
    if not args.data:
        if is_bytes:
            train, val = builtin_corpus("bytes")
            return Data([train], [val], BYTE_VOCAB, None, True)
        if args.tokenizer is not None:
            sys.exit("error: --tokenizer DIR needs --data text files (the built-in corpus has its own BPE)")
        vocab = args.vocab_size or DEFAULT_BPE_VOCAB
        train, val = builtin_corpus("bpe", vocab_size=vocab)
        bpe = builtin_tokenizer(vocab)
        bpe.save(out_dir / "tokenizer")
        return Data([train], [val], bpe.vocab_size, bpe, False)

    paths = [Path(p) for p in args.data + (args.val_data or [])]
    for path in paths:
        if not path.exists():
            sys.exit(f"error: data file {path} does not exist")
    if all(p.suffix == ".bin" for p in paths):  # token shards: used as they are
        bpe = _tokenizer_for(args, None, out_dir)
        vocab = args.vocab_size or (bpe.vocab_size if bpe else 50257)
        train = [read_llmc_tokens(p, vocab) for p in args.data]
        if args.val_data:
            val = [read_llmc_tokens(p, vocab) for p in args.val_data]
        else:
            last = np.asarray(train[-1])
            split = int(len(last) * 0.95)
            train[-1], val = last[:split], [last[split:]]
        return Data(train, val, vocab, bpe, False)
    if any(p.suffix == ".bin" for p in paths):
        sys.exit("error: --data mixes text files and .bin shards")

    def read(names):
        return "".join(Path(n).read_text(encoding="utf-8", errors="replace") for n in names)

    text = read(args.data)
    if is_bytes:
        encode, vocab, bpe = text_to_byte_tokens, BYTE_VOCAB, None
    else:
        bpe = _tokenizer_for(args, text, out_dir)
        bpe.save(out_dir / "tokenizer")
        encode, vocab = (lambda t: encode_text(bpe, t)), bpe.vocab_size
    tokens = encode(text)
    if args.val_data:
        train, val = tokens, encode(read(args.val_data))
    else:
        split = int(len(tokens) * 0.95)
        train, val = tokens[:split], tokens[split:]
    return Data([train], [val], vocab, bpe, is_bytes)


def prepare_run(args):
    """What every training script does first: (dtype, data, checkpoint to resume or None),
    printing the data's size."""
    dtype = np.float32 if args.dtype == "float32" else np.float64
    with dist.world(args.device).rank0_first():   # rank 0 writes the caches (corpus, tokenizer) the others read
        data = load_data(args)
    print(f"data: {sum(map(len, data.train)):,} train / {sum(map(len, data.val)):,} val tokens, "
          f"vocab {data.vocab_size}")
    return dtype, data, resume_path(args)


def resume_path(args) -> Optional[Path]:
    """The checkpoint --resume names ('latest' = the newest in --out-dir), or None."""
    if not args.resume:
        return None
    if args.resume == "latest":
        path = latest_checkpoint(args.out_dir)
        if path is None:
            print(f"no checkpoint in {args.out_dir} yet: starting from scratch")
        return path
    try:   # a save interrupted while replacing the folder left its previous version beside it
        path = resolve_checkpoint(args.resume)
    except FileNotFoundError:
        sys.exit(f"error: {args.resume} is not a checkpoint folder")
    if not (path / "state.json").exists():
        sys.exit(f"error: {path} is not a checkpoint folder (no state.json)")
    return path


def unigram_loss(train: list, val: list, vocab_size: int) -> float:
    """Cross-entropy on val of the train split's token frequencies (add-one smoothed):
    the loss a model that ignores context would get."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for t in train:
        counts += np.bincount(np.asarray(t), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for t in val:
        total -= float(logp[np.asarray(t)].sum())
        n += len(t)
    return total / max(n, 1)


class LossLog:
    """log.jsonl in the run folder: one JSON object per line (step, train_loss, val_loss,
    lr, ms). Resuming at step k drops the lines after k, so the log reads like one run."""

    def __init__(self, out_dir, resume_step: Optional[int] = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "log.jsonl"
        keep = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                # step k's train loss came before the checkpoint; its evaluation runs again
                if entry["step"] < resume_step or (entry["step"] == resume_step and "train_loss" in entry):
                    keep.append(line + "\n")
        self.path.write_text("".join(keep))

    def write(self, **entry) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def plot(self, baseline: Optional[float] = None) -> Optional[Path]:
        """loss.png of train and val loss, when matplotlib is installed. Drawn in a child
        process: importing matplotlib here would add ~40 MiB to the run's resident memory."""
        out = self.dir / "loss.png"
        done = subprocess.run([sys.executable, "-c", _PLOT_LOSSES, str(self.path), str(out), repr(baseline)],
                              capture_output=True, text=True)
        if done.returncode == 3:   # no matplotlib
            return None
        if done.returncode != 0:
            print(f"loss plot failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        return out


# LossLog.plot's child: argv = log.jsonl, loss.png, baseline (a float or None); exit 3 = no matplotlib
_PLOT_LOSSES = """
import json, sys
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(3)
log, out, baseline = sys.argv[1], sys.argv[2], None if sys.argv[3] == "None" else float(sys.argv[3])
entries = [json.loads(line) for line in open(log, encoding="utf-8").read().splitlines()]
fig, ax = plt.subplots(figsize=(7, 4))
for key, style in (("train_loss", "-"), ("val_loss", "o-")):
    pts = [(e["step"], e[key]) for e in entries if key in e]
    if pts:
        ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=3)
if baseline is not None:
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=100)
"""


def progress(step: int, total: int, text: str) -> None:
    """A one-line progress bar on stderr (every 10th step when not a terminal)."""
    width = 24
    filled = width * step // total
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if step == total or not sys.stderr.isatty() else ""
    if sys.stderr.isatty() or step == total or step % 10 == 0:
        print(f"\r[{bar}] {step}/{total} {text}", end=end, file=sys.stderr, flush=True)



class BatchSource(Protocol):
    """Where train() draws its batches from (see the module docstring)."""

    def next_batch(self) -> Any: ...

    def state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


LossFn = Callable[[Any, Any], Tensor]   # (model, batch) -> the (1,) loss tensor on model.tape


def lm_loss(model, batch: tuple[np.ndarray, np.ndarray]) -> Tensor:
    """The model's own loss on an (idx, targets) batch: next-token cross-entropy (plus the
    model's extras: multi-token heads, z-loss...), targets -1 ignored."""
    idx, targets = batch
    return model.forward(idx, targets)[1]


def loss_value(model, loss: Tensor) -> float:
    """A (1,) loss tensor's value as a Python float (one small copy from a device)."""
    return float(model.tape.k.to_host(loss.data)[0])


def accumulate_grads(model, next_batch: Callable[[], Any], micro_batches: int = 1,
                     scaler: Optional[GradScaler] = None, loss_fn: LossFn = lm_loss,
                     zero_grad: bool = True) -> float:
    """Gradient accumulation: zero the grads, then `micro_batches` times draw a batch from
    next_batch() and run loss_fn's forward + its backward (grads add up); finally scale
    the trainable grads by 1/K. Returns the mean loss. zero_grad=False skips the zeroing,
    for a caller whose optimizer left the grads zero (step(zero_grad=True), as train() does).

    Each micro-batch is drawn only after the previous one's backward, so a loader that
    reuses its arrays (DataLoader does) serves K different batches. With K equal
    micro-batches of size B/K and a mean loss, the grads equal one batch of size B. With a
    `scaler`, each backward is seeded with its loss scale (unscale before the step).
    """
    if micro_batches < 1:
        raise ValueError(f"accumulate_grads needs at least one micro-batch, got {micro_batches}")
    if zero_grad:
        model.zero_grad()
    total = 0.0
    for _ in range(micro_batches):
        loss = loss_fn(model, next_batch())
        total += loss_value(model, loss)
        if scaler is None:
            model.tape.backward(loss)
        else:
            scaler.backward(model.tape, loss)
    if micro_batches > 1:
        scale_grads(model.trainable_params, 1.0 / micro_batches)
    return total / micro_batches


def eval_loss(model, batches: Iterable, loss_fn: LossFn = lm_loss) -> float:
    """The mean of loss_fn over `batches` (an iterable drawn one batch at a time), in eval
    mode (no dropout); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        losses = [loss_value(model, loss_fn(model, batch)) for batch in batches]
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("eval_loss needs at least one batch")
    return sum(losses) / len(losses)


def train(args, model, source: BatchSource, loss_fn: LossFn = lm_loss, *,
          evaluate: Optional[Callable[[], float]] = None, resume: Optional[Path] = None,
          extra: Optional[dict] = None, baseline: Optional[float] = None) -> None:
    """The training loop every script shares (see the module docstring): optimise
    `model.trainable_params` on loss_fn over batches from `source` for args.steps steps,
    with the schedule, accumulation, loss scaling and clipping the flags ask for; evaluate,
    log, checkpoint, and continue exactly from the checkpoint `resume` (the caller built
    `model` for it: from the checkpoint's weights, or the base with its adapters attached).
    `baseline` is drawn in loss.png."""
    if args.grad_accum < 1:
        sys.exit(f"error: --grad-accum must be >= 1, got {args.grad_accum}")
    try:   # callers that build args without add_loop_args train in the model's own precision
        model.tape.set_precision(getattr(args, "precision", model.tape.precision))
    except ValueError as e:
        sys.exit(f"error: --precision: {e}")
    params = model.trainable_params
    # a run that trains adapters on a frozen base checkpoints the adapters alone
    stored = params if params is not model.params else None
    world, zero = dist.world(), getattr(args, "zero", 0)
    if world.size > 1:  # every rank starts from rank 0's weights, on its own share of the same data
        world.check_same("the runs' settings or data", vars(args), dataclasses.asdict(model.config), params.size,
                         *getattr(source, "shards", ()))
        source = dist.split_source(source, world)
        world.broadcast_params(model.params)
    if zero and args.loss_scale:
        sys.exit("error: --loss-scale is not supported with --zero 1")
    # averages the grads over ranks (one rank: the plain optimizer)
    optimizer = dist.DataParallel(params, lambda p: make_optimizer(args.optimizer, p, args.lr, args.weight_decay),
                                  zero=zero, w=world)
    schedule = CosineSchedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    scaler = GradScaler(params) if args.loss_scale else None
    start = 0
    if resume is not None:
        requested = schedule.state_dict()
        restored = load_checkpoint(resume, model, optimizer, schedule=schedule, loaders={"train": source},
                                   weights=False, params=stored)
        if schedule.state_dict() != requested:
            print(f"note: continuing the checkpoint's learning-rate schedule {schedule.state_dict()}; "
                  f"the flags asked for {requested}")
        start = restored.step
        if scaler is not None and "scaler" in restored.extra:
            scaler.load_state_dict(restored.extra["scaler"])
        print(f"resumed from {resume} at step {start}")
    log = LossLog(args.out_dir, start if resume is not None else None) if world.is_main else None

    def checkpoint(step: int) -> None:
        state = dict(extra or {})
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if world.size > 1:  # ranks that drifted apart would make a checkpoint of rank 0 alone wrong
            world.check_same(f"the parameters at step {step}", params.to_flat())
        saved = dist.Gathered(optimizer.state_dict())  # collective under ZeRO
        if world.is_main:
            path = save_run_checkpoint(args.out_dir, step, model, saved, keep_last=args.keep_last,
                                       loaders={"train": source}, schedule=schedule, extra=state, params=stored)
            print(f"\nsaved checkpoint {path}", file=sys.stderr, flush=True)
        world.barrier()

    # The clip factor is made beside the grads (clip_scale: nothing read back before the
    # update) and the update leaves the grads zero in its own pass (step(zero_grad=True)),
    # so a step makes one pass over the grads fewer than zero_grad + clip_factor + step.
    # Under ZeRO each rank updates a shard (the norm is a collective and the rest of the
    # grads would stay), and with adapters on a base that still has trainable parts
    # model.zero_grad() covers more than the optimizer: those keep the separate passes.
    fused = not optimizer.zero and (model.adapters is None or model.params.size == 0)
    if fused:
        model.zero_grad()   # once: from here on every update leaves the grads zero
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world.size
    times = []
    for step in range(start, args.steps + 1):
        last = step == args.steps
        if evaluate is not None and args.eval_every > 0 and (step % args.eval_every == 0 or last):
            val = evaluate()
            if world.is_main:
                log.write(step=step, val_loss=val)
                print(f"\nstep {step}: val loss {val:.4f}", file=sys.stderr, flush=True)
        if last:
            break
        t0 = time.perf_counter()
        # zero grads, forward + backward each micro-batch, grads /= grad_accum
        loss = accumulate_grads(model, source.next_batch, args.grad_accum, scaler, loss_fn, zero_grad=not fused)
        optimizer.sync_grads()     # grads averaged over ranks (under ZeRO: this rank's slice)
        loss = world.mean(loss)
        finite = scaler.unscale_() if scaler is not None else True  # grads /= loss scale, inf/nan check
        # the clipping factor goes into the optimizer's update: no extra pass over the grads
        norm, clip = float("nan"), 1.0
        if args.grad_clip > 0 and finite:
            if fused:   # [factor, norm] on the grads' device, read by the update kernel
                clip = optimizer.optimizer.clip_scale(args.grad_clip)
            else:
                norm, clip = optimizer.clip_factor(args.grad_clip)
        lr = schedule(step)
        step_args = {"lr": lr, "grad_scale": clip, "loss": loss}
        if fused:
            step_args["zero_grad"] = True   # a skipped step zeroes them too (GradScaler.update)
        if scaler is not None:
            scaler.step(optimizer, **step_args)  # skipped (and counted) on non-finite grads
        else:
            optimizer.step(**step_args)
        if not isinstance(clip, float):   # the norm for the log, read after the update is issued
            norm = float(params.k.to_host(clip)[1])
        dt = time.perf_counter() - t0
        times.append(dt)
        if world.is_main:
            log.write(step=step + 1, train_loss=loss, lr=lr, ms=round(dt * 1e3, 2))
            scaling = f" scale {scaler.scale:g} skipped {scaler.skipped_steps}" if scaler is not None else ""
            progress(step + 1, args.steps, f"loss {loss:.4f} norm {norm:.2f} lr {lr:.2e}{scaling} "
                                           f"{dt * 1e3:.0f} ms/step {tokens_per_step / dt:,.0f} tok/s")
        if args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)
    if args.checkpoint_every > 0 and start < args.steps:
        checkpoint(args.steps)
    if len(times) > 1:
        steady = sorted(times[1:])[len(times[1:]) // 2]
        print(f"median step {steady * 1e3:.1f} ms, {tokens_per_step / steady:,.0f} tokens/s "
              f"(first step with compilation: {times[0]:.1f} s)")
    world.collectives_done()
    if world.is_main:
        png = log.plot(baseline)
        print(f"loss log: {log.path}" + (f", curve: {png}" if png else ""))


def check_fits(model, vocab_size: int, seq_len: int) -> None:
    """Exit with a message when the model cannot take the data's tokens or -T positions."""
    cfg = model.config
    if cfg.vocab_size < vocab_size:
        sys.exit(f"error: model vocab {cfg.vocab_size} < data vocab {vocab_size}")
    if seq_len > cfg.block_size:
        sys.exit(f"error: -T {seq_len} exceeds the model's block_size {cfg.block_size}")


def evaluator(model, source: BatchSource, batches: int, loss_fn: LossFn = lm_loss) -> Callable[[], float]:
    """evaluate() for train(): loss_fn's mean over the first `batches` batches of
    `source`, rewound before each evaluation, so every evaluation sees the same batches."""
    start = source.state()

    def evaluate() -> float:   # averaged over ranks (each evaluates its share of a rank-aware source)
        source.set_state(start)
        return dist.world().mean(eval_loss(model, (source.next_batch() for _ in range(batches)), loss_fn))
    return evaluate


def token_loaders(args, data: Data, model, loss_fn: LossFn = lm_loss) -> tuple[DataLoader, Callable[[], float]]:
    """The shuffled training DataLoader over data.train, and evaluate(): loss_fn's mean
    over the first --eval-batches batches of data.val."""
    B, T, V = args.batch_size, args.seq_len, model.config.vocab_size
    ranks = {"rank": dist.world().rank, "world_size": dist.world().size}  # each rank its share of every batch
    train_loader = DataLoader(data.train, B, T, shuffle=True, seed=args.seed, vocab_size=V, **ranks)
    val_loader = DataLoader(data.val, B, T, vocab_size=V, **ranks)
    return train_loader, evaluator(model, val_loader, min(args.eval_batches, val_loader.batches_per_epoch), loss_fn)


def pretrain(args, model, data: Data, resume: Optional[Path] = None) -> None:
    """Next-token training on token streams (train_gpt2.py, train_llama.py): the loaders,
    the unigram baseline, train(), then a sample from --prompt."""
    check_fits(model, data.vocab_size, args.seq_len)
    train_loader, evaluate = token_loaders(args, data, model)
    V = model.config.vocab_size
    baseline = unigram_loss(data.train, data.val, V)
    print(f"unigram baseline val loss: {baseline:.4f}   uniform: {math.log(V):.4f}")
    train(args, model, train_loader, evaluate=evaluate, resume=resume, baseline=baseline)
    if args.sample_tokens > 0 and dist.world().is_main:
        sample(args, model, data)


def sample(args, model, data: Data) -> None:
    """Print a continuation of --prompt (--sample-tokens, --temperature, --top-k, --seed)."""
    prompt = data.encode(args.prompt) if data.tokenizer is not None or data.is_bytes else np.array([0])
    out = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    text = data.decode(out)
    print(f"\n--- sample (temperature {args.temperature}, top-k {args.top_k}) ---")
    print(text if text is not None else out.tolist())


# ---------------------------------------------------------------------- starting from a pretrained model

@dataclasses.dataclass
class Pretrained:
    """A model to start from, its tokenizer, and the file or checkpoint folder it came from."""
    model: Any
    tokenizer: Any
    source: Path


def load_tokenizer(path):
    """A tokenizer folder: nt's BPE (vocab.json + merges.txt) or Hugging Face's tokenizer.json."""
    path = Path(path)
    if (path / "merges.txt").is_file():
        return BPE.load(path)
    if (path / "tokenizer.json").is_file():
        from .tokenizer import from_pretrained
        return from_pretrained(path)
    raise ValueError(f"{path}: no tokenizer (vocab.json + merges.txt, or tokenizer.json) in it")


def load_pretrained(path, tokenizer=None, device: str = "cpu", dtype=np.float32) -> Pretrained:
    """The model at `path` with its tokenizer: a training run folder (its latest
    checkpoint, the run's tokenizer/), an nt checkpoint folder (a run's step folder: the
    run's tokenizer/), a .gguf file (the file's tokenizer) or a Hugging Face folder
    (config.json + safetensors, tokenizer.json). `tokenizer` (a folder) overrides; a model
    of at most 256 tokens without one reads bytes as tokens."""
    from .models import from_gguf, from_pretrained
    path = Path(path)
    tok_dir = None
    if path.is_file() and path.suffix == ".gguf":
        source, model = path, from_gguf(path, device=device)
    elif (path / LATEST).is_file():
        source = latest_checkpoint(path)
        model, tok_dir = load_model(source, device=device, dtype=dtype), path / "tokenizer"
    elif (path / "state.json").is_file():
        source, model, tok_dir = path, load_model(path, device=device, dtype=dtype), path.parent / "tokenizer"
    elif (path / "config.json").is_file():
        source, model, tok_dir = path, from_pretrained(path, device=device, dtype=dtype), path
    else:
        raise ValueError(f"{path}: not a training run folder, nt checkpoint folder, .gguf file or Hugging Face folder")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif tok_dir is not None and ((tok_dir / "merges.txt").is_file() or (tok_dir / "tokenizer.json").is_file()):
        tok = load_tokenizer(tok_dir)
    else:
        tok = model.tokenizer
    if tok is None:
        if model.config.vocab_size > 256:
            raise ValueError(f"{path} comes with no tokenizer and has {model.config.vocab_size} tokens: "
                             "name its tokenizer folder")
        tok = ByteTokenizer()
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {model.config.vocab_size}")
    model.tokenizer = tok
    return Pretrained(model, tok, source.resolve())


def weights_digest(params) -> str:
    """SHA-256 of every parameter's values in canonical order: tells whether a resumed
    run found the same base it started from."""
    h = hashlib.sha256()
    for name, t in sorted(params.items(), key=lambda kv: params.offsets[kv[0]]):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params.k.to_host(t.data)).tobytes())
    return h.hexdigest()


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """The flags of a run that adapts a pretrained model: the base, LoRA or full fine-tuning."""
    p.add_argument("--base", default=None,
                   help="the model to adapt: a training run folder (its latest checkpoint), an nt checkpoint folder, "
                        "a .gguf file or a Hugging Face folder (resuming: the run's own base by default)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (vocab.json + merges.txt, or tokenizer.json); default: the base's")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 16 unless --full)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the adapters are scaled by alpha/r "
                                                                  "(default 2r)")
    p.add_argument("--lora-targets", default="all",
                   help="comma list of the linears to adapt (GPT-2: qkv,o,fc,proj; Llama: q,k,v,o,gate,up,down) "
                        "or 'all' (default)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    p.add_argument("--full", action="store_true", help="fine-tune every parameter instead of LoRA adapters")
    p.add_argument("--freeze", default="",
                   help="with --full: comma list of parameters to keep frozen (e.g. wte,wpe)")


def _finetune_plan(args, model) -> dict:
    """What to train, from the flags: {"lora": LoRA keyword arguments or None, "freeze": names}."""
    if args.full:
        if args.lora_rank is not None:
            raise ValueError("--full and --lora-rank exclude each other")
        frozen = parse_targets(args.freeze)
        unknown = [n for n in frozen if n not in model.params]
        if unknown:
            raise ValueError(f"--freeze names {unknown}, which are not parameters of this model; it has {list(model.params)}")
        return {"lora": None, "freeze": frozen}
    if args.freeze:
        raise ValueError("--freeze needs --full (LoRA freezes the whole base)")
    rank = 16 if args.lora_rank is None else args.lora_rank
    targets = all_targets(model) if args.lora_targets.strip() == "all" else parse_targets(args.lora_targets)
    alpha = 2.0 * rank if args.lora_alpha is None else args.lora_alpha
    return {"lora": {"rank": rank, "alpha": alpha, "targets": targets, "dropout": args.lora_dropout}, "freeze": []}


def prepare_finetune(args, resume: Optional[Path], dtype) -> tuple[Any, Any, dict]:
    """(model ready to train, tokenizer, extra for the checkpoints) of a fine-tuning run:
    the base from --base, then LoRA adapters attached (model.trainable_params are them)
    or, with --full, the parameters not named in --freeze trainable. Resuming, the base
    and the plan come from the checkpoint (the base must be unchanged: its digest is
    kept), and a full fine-tune's weights from the checkpoint too; a LoRA run's adapters
    are restored by train(resume=...). Bad flags raise ValueError."""
    saved = checkpoint_state(resume)["extra"].get("finetune") if resume is not None else None
    base = args.base or (saved["base"] if saved else None)
    if base is None:
        raise ValueError("--base is required: a training run folder, nt checkpoint folder, .gguf file or "
                         "Hugging Face folder")
    pre = load_pretrained(base, args.tokenizer, args.device, dtype)
    model, digest = pre.model, weights_digest(pre.model.params)
    if saved is not None and saved["base_digest"] != digest:
        raise ValueError(f"{base} is not the base this run started from ({saved['base']}): its weights differ")
    plan = saved or {"base": str(pre.source), "base_digest": digest, **_finetune_plan(args, model)}
    if plan["lora"]:
        lora = LoRA(model, seed=args.seed, **plan["lora"])
        print(f"LoRA r={lora.rank} alpha={lora.alpha:g} on {', '.join(lora.targets)}: "
              f"{lora.params.size:,} trainable of {model.num_params:,} parameters")
    else:
        if resume is not None:
            load_weights(resume / MODEL_WEIGHTS, model)   # the fine-tuned weights so far
        if plan["freeze"]:
            model.freeze(trainable=[n for n in model.params if n not in plan["freeze"]])
        print(f"full fine-tuning: {model.params.size:,} trainable of {model.num_params:,} parameters")
    return model, pre.tokenizer, {"finetune": plan}
