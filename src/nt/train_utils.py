"""What every training script shares: data and tokenizer options, run folders with
checkpoints and resume, the loss log (JSONL + PNG curve), the progress bar.

    p = argparse.ArgumentParser(); add_data_args(p); add_run_args(p)
    data = load_data(args)                     # shards + tokenizer, BPE by default
    resume = resume_path(args)                 # a checkpoint folder or None
    log = LossLog(args.out_dir, resume_step)   # log.write(step=..., train_loss=...)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .data import (BYTE_VOCAB, DEFAULT_BPE_VOCAB, builtin_corpus, builtin_tokenizer, byte_tokens_to_text,
                   encode_text, text_to_byte_tokens)
from .io import latest_checkpoint, read_llmc_tokens
from .tokenizer import BPE


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


def resume_path(args) -> Optional[Path]:
    """The checkpoint --resume names ('latest' = the newest in --out-dir), or None."""
    if not args.resume:
        return None
    if args.resume == "latest":
        path = latest_checkpoint(args.out_dir)
        if path is None:
            print(f"no checkpoint in {args.out_dir} yet: starting from scratch")
        return path
    path = Path(args.resume)
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

