"""What every training script shares: the common flags, data and tokenizer, run folders
with checkpoints and resume, the loss log (JSONL + PNG curve), the training loop.

    p = argparse.ArgumentParser(); add_training_args(p); ...model flags...
    args = p.parse_args()
    data = load_data(args)                     # token arrays + tokenizer, BPE by default
    resume = resume_path(args)                 # a checkpoint folder or None
    model = load_model(resume) if resume else MyModel(...)   # resuming: weights from the checkpoint
    train(args, model, data, resume)           # loop, eval, log, checkpoints, sample (and
                                               # optimizer, schedule, data position from resume)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .data import (BYTE_VOCAB, DEFAULT_BPE_VOCAB, DataLoader, builtin_corpus, builtin_tokenizer,
                   byte_tokens_to_text, encode_text, text_to_byte_tokens)
from .io import latest_checkpoint, load_checkpoint, read_llmc_tokens, resolve_checkpoint, save_run_checkpoint
from .optim import OPTIMIZERS, CosineSchedule, GradScaler, clip_factor, make_optimizer, scale_grads
from .tokenizer import BPE


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The flags every training script takes: data, run folder, optimisation, sampling."""
    add_data_args(p)
    add_run_args(p)
    p.add_argument("-B", "--batch-size", type=int, default=16)
    p.add_argument("-T", "--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
                   help="adamw (default), adam, sgd (momentum 0.9) or chuck (AdamW that watches the loss)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of -B sequences per optimizer step (effective batch: grad_accum * B)")
    p.add_argument("--loss-scale", action="store_true",
                   help="dynamic loss scaling with a NaN/Inf guard: steps with non-finite grads are skipped")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--sample-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--prompt", default="The")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)


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
        """loss.png of train and val loss, when matplotlib is installed."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        entries = [json.loads(line) for line in self.path.read_text().splitlines()]
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
        out = self.dir / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def progress(step: int, total: int, text: str) -> None:
    """A one-line progress bar on stderr (every 10th step when not a terminal)."""
    width = 24
    filled = width * step // total
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if step == total or not sys.stderr.isatty() else ""
    if sys.stderr.isatty() or step == total or step % 10 == 0:
        print(f"\r[{bar}] {step}/{total} {text}", end=end, file=sys.stderr, flush=True)



def accumulate_grads(model, next_batch: Callable[[], tuple], micro_batches: int = 1,
                     scaler: Optional[GradScaler] = None) -> float:
    """Gradient accumulation: zero the grads, then `micro_batches` times draw (idx, targets)
    from next_batch() and run forward + backward (grads add up); finally scale the grads
    by 1/K. Returns the mean loss.

    Each micro-batch is drawn only after the previous one's backward, so a loader that
    reuses its arrays (DataLoader does) serves K different batches. With K equal
    micro-batches of size B/K and a mean loss, the grads equal one batch of size B. With a
    `scaler`, each backward is seeded with its loss scale (unscale before the step).
    """
    if micro_batches < 1:
        raise ValueError(f"accumulate_grads needs at least one micro-batch, got {micro_batches}")
    model.zero_grad()
    total = 0.0
    for _ in range(micro_batches):
        _, loss = model.forward(*next_batch())
        total += float(model.tape.k.to_host(loss.data)[0])
        if scaler is None:
            model.backward()
        else:
            scaler.backward(model.tape, loss)
    if micro_batches > 1:
        scale_grads(model.params, 1.0 / micro_batches)
    return total / micro_batches


def train(args, model, data: Data, resume: Optional[Path] = None) -> None:
    """The training loop shared by the scripts: --optimizer with warmup + cosine decay,
    gradient accumulation, optional loss scaling, grad clipping, evaluation, log.jsonl,
    checkpoints every --checkpoint-every steps, exact resume from `resume`, a loss curve
    and a sample at the end."""
    cfg = model.config
    if cfg.vocab_size < data.vocab_size:
        sys.exit(f"error: model vocab {cfg.vocab_size} < data vocab {data.vocab_size}")
    if args.seq_len > cfg.block_size:
        sys.exit(f"error: -T {args.seq_len} exceeds the model's block_size {cfg.block_size}")
    B, T = args.batch_size, args.seq_len
    train_loader = DataLoader(data.train, B, T, shuffle=True, seed=args.seed, vocab_size=cfg.vocab_size)
    val_loader = DataLoader(data.val, B, T, vocab_size=cfg.vocab_size)
    baseline = unigram_loss(data.train, data.val, cfg.vocab_size)
    print(f"unigram baseline val loss: {baseline:.4f}   uniform: {math.log(cfg.vocab_size):.4f}")

    if args.grad_accum < 1:
        sys.exit(f"error: --grad-accum must be >= 1, got {args.grad_accum}")
    optimizer = make_optimizer(args.optimizer, model.params, args.lr, args.weight_decay)
    schedule = CosineSchedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    scaler = GradScaler(model.params) if args.loss_scale else None
    start = 0
    if resume is not None:
        # the script built `model` from this folder (load_model): its weights are in place
        requested = schedule.state_dict()
        restored = load_checkpoint(resume, model, optimizer, schedule=schedule, loaders={"train": train_loader},
                                   weights=False)
        if schedule.state_dict() != requested:
            print(f"note: continuing the checkpoint's learning-rate schedule {schedule.state_dict()}; "
                  f"the flags asked for {requested}")
        start = restored.step
        if scaler is not None and "scaler" in restored.extra:
            scaler.load_state_dict(restored.extra["scaler"])
        print(f"resumed from {resume} at step {start}")
    log = LossLog(args.out_dir, start if resume is not None else None)

    def evaluate() -> float:
        model.eval()
        val_loader.set_state({"epoch": 0, "position": 0})
        n = min(args.eval_batches, val_loader.batches_per_epoch)
        loss = sum(model(*val_loader.next_batch())[1] for _ in range(n)) / n
        model.train()
        return loss

    def checkpoint(step: int) -> None:
        path = save_run_checkpoint(args.out_dir, step, model, optimizer, keep_last=args.keep_last,
                                   loaders={"train": train_loader}, schedule=schedule,
                                   extra={"scaler": scaler.state_dict()} if scaler is not None else None)
        print(f"\nsaved checkpoint {path}", file=sys.stderr, flush=True)

    times = []
    for step in range(start, args.steps + 1):
        last = step == args.steps
        if args.eval_every > 0 and (step % args.eval_every == 0 or last):
            val = evaluate()
            log.write(step=step, val_loss=val)
            print(f"\nstep {step}: val loss {val:.4f}", file=sys.stderr, flush=True)
        if last:
            break
        t0 = time.perf_counter()
        # zero grads, forward + backward each micro-batch, grads /= grad_accum
        loss_value = accumulate_grads(model, train_loader.next_batch, args.grad_accum, scaler)
        finite = scaler.unscale_() if scaler is not None else True  # grads /= loss scale, inf/nan check
        # the clipping factor goes into the optimizer's update: no extra pass over the grads
        norm, clip = clip_factor(model.params, args.grad_clip) if args.grad_clip > 0 and finite else (float("nan"), 1.0)
        lr = schedule(step)
        step_args = {"lr": lr, "grad_scale": clip, "loss": loss_value}
        if scaler is not None:
            scaler.step(optimizer, **step_args)  # skipped (and counted) on non-finite grads
        else:
            optimizer.step(**step_args)
        dt = time.perf_counter() - t0
        times.append(dt)
        log.write(step=step + 1, train_loss=loss_value, lr=lr, ms=round(dt * 1e3, 2))
        extra = f" scale {scaler.scale:g} skipped {scaler.skipped_steps}" if scaler is not None else ""
        progress(step + 1, args.steps, f"loss {loss_value:.4f} norm {norm:.2f} lr {lr:.2e}{extra} "
                                       f"{dt * 1e3:.0f} ms/step {B * T * args.grad_accum / dt:,.0f} tok/s")
        if args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)
    if args.checkpoint_every > 0 and start < args.steps:
        checkpoint(args.steps)
    if len(times) > 1:
        steady = sorted(times[1:])[len(times[1:]) // 2]
        print(f"median step {steady * 1e3:.1f} ms, {B * T * args.grad_accum / steady:,.0f} tokens/s "
              f"(first step with compilation: {times[0]:.1f} s)")
    png = log.plot(baseline)
    print(f"loss log: {log.path}" + (f", curve: {png}" if png else ""))

    if args.sample_tokens > 0:
        prompt = data.encode(args.prompt) if data.tokenizer is not None or data.is_bytes else np.array([0])
        out = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed)
        text = data.decode(out)
        print(f"\n--- sample (temperature {args.temperature}, top-k {args.top_k}) ---")
        print(text if text is not None else out.tolist())
