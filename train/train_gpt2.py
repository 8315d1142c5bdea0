"""Train GPT-2 with nt, llm.c-style: built-in corpus by default, or your text / llm.c shards.

    python train/train_gpt2.py                         # small GPT on the built-in corpus
    python train/train_gpt2.py --preset d12 --init-from gpt2_124M.bin --data shard.bin
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

import nt
from nt.data import BYTE_VOCAB, DataLoader, builtin_corpus, byte_tokens_to_text, text_to_byte_tokens
from nt.io import read_llmc_tokens
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW, CosineSchedule, clip_grad_norm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help=f"model shape: {', '.join(sorted(GPT2Config.PRESETS))}")
    p.add_argument("--data", nargs="*", default=None,
                   help="training text files (.txt, bytes as tokens) or llm.c token shards (.bin); "
                        "default: the built-in corpus")
    p.add_argument("--val-data", nargs="*", default=None, help="validation files (default: last 5%% of --data)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of .bin shards (default: 50257 for shards, 256 for text)")
    p.add_argument("--init-from", default=None, help="start from an llm.c GPT-2 checkpoint (.bin)")
    p.add_argument("--save", default=None, help="write the final weights as an llm.c checkpoint here")
    p.add_argument("-B", "--batch-size", type=int, default=16)
    p.add_argument("-T", "--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_tokens(paths: list[str], vocab_size: int | None) -> np.ndarray:
    parts = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            sys.exit(f"error: data file {path} does not exist")
        if path.suffix == ".bin":
            parts.append(np.asarray(read_llmc_tokens(path, vocab_size)))
        else:
            parts.append(text_to_byte_tokens(path.read_text(encoding="utf-8", errors="replace")))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy on val of the train split's token frequencies (add-one smoothed):
    the loss a model that ignores context would get."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def progress(step: int, total: int, text: str) -> None:
    width = 24
    filled = width * step // total
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if step == total or not sys.stderr.isatty() else ""
    if sys.stderr.isatty() or step == total or step % 10 == 0:
        print(f"\r[{bar}] {step}/{total} {text}", end=end, file=sys.stderr, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = np.float32 if args.dtype == "float32" else np.float64

    # ---------------------------------------------------------------- data
    if args.data:
        has_shards = any(Path(p).suffix == ".bin" for p in args.data)
        vocab_size = args.vocab_size or (50257 if has_shards else BYTE_VOCAB)
        tokens = load_tokens(args.data, vocab_size)
        if args.val_data:
            train_tokens, val_tokens = tokens, load_tokens(args.val_data, vocab_size)
        else:
            split = int(len(tokens) * 0.95)
            train_tokens, val_tokens = tokens[:split], tokens[split:]
        is_bytes = not has_shards
    else:
        train_tokens, val_tokens = builtin_corpus()
        vocab_size, is_bytes = BYTE_VOCAB, True
    print(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, vocab {vocab_size}")

    # ---------------------------------------------------------------- model
    if args.init_from:
        model = GPT2.from_llmc(args.init_from, device=args.device, dtype=dtype)
        if model.config.vocab_size < vocab_size:
            sys.exit(f"error: checkpoint vocab {model.config.vocab_size} < data vocab {vocab_size}")
    else:
        config = GPT2Config.preset(args.preset, vocab_size=vocab_size,
                                   block_size=max(args.seq_len, GPT2Config.PRESETS[args.preset].get("block_size", 1024)))
        model = GPT2(config, device=args.device, dtype=dtype, seed=args.seed)
    cfg = model.config
    if args.seq_len > cfg.block_size:
        sys.exit(f"error: -T {args.seq_len} exceeds the model's block_size {cfg.block_size}")
    print(f"model: GPT-2 L={cfg.n_layer} C={cfg.n_embd} NH={cfg.n_head} V={cfg.vocab_size} "
          f"(padded {cfg.padded_vocab_size}) T<={cfg.block_size}: {model.num_params:,} parameters")

    B, T = args.batch_size, args.seq_len
    train_loader = DataLoader(train_tokens, B, T, shuffle=True, seed=args.seed, vocab_size=cfg.vocab_size)
    val_loader = DataLoader(val_tokens, B, T, vocab_size=cfg.vocab_size)
    baseline = unigram_loss(np.asarray(train_tokens), np.asarray(val_tokens), cfg.vocab_size)
    print(f"unigram baseline val loss: {baseline:.4f}   uniform: {math.log(cfg.vocab_size):.4f}")

    optimizer = AdamW(model.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    schedule = CosineSchedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)

    def evaluate() -> float:
        val_loader.set_state({"epoch": 0, "position": 0})
        n = min(args.eval_batches, val_loader.batches_per_epoch)
        return sum(model(*val_loader.next_batch())[1] for _ in range(n)) / n

    # ---------------------------------------------------------------- train
    times = []
    for step in range(args.steps + 1):
        last = step == args.steps
        if args.eval_every > 0 and (step % args.eval_every == 0 or last):
            print(f"\nstep {step}: val loss {evaluate():.4f}", file=sys.stderr, flush=True)
        if last:
            break
        t0 = time.perf_counter()
        x, y = train_loader.next_batch()
        _, loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        norm = clip_grad_norm(model.params, args.grad_clip) if args.grad_clip > 0 else float("nan")
        lr = schedule(step)
        optimizer.step(lr)
        loss_value = float(model.tape.k.to_host(loss.data)[0])
        dt = time.perf_counter() - t0
        times.append(dt)
        progress(step + 1, args.steps, f"loss {loss_value:.4f} norm {norm:.2f} lr {lr:.2e} "
                                       f"{dt * 1e3:.0f} ms/step {B * T / dt:,.0f} tok/s")
    if len(times) > 1:
        steady = sorted(times[1:])[len(times[1:]) // 2]
        print(f"median step {steady * 1e3:.1f} ms, {B * T / steady:,.0f} tokens/s "
              f"(first step with compilation: {times[0]:.1f} s)")

    if args.save:
        model.save_llmc(args.save)
        print(f"saved llm.c checkpoint to {args.save}")

    # ---------------------------------------------------------------- sample
    if args.sample_tokens > 0 and is_bytes:
        prompt = text_to_byte_tokens(args.prompt)
        print(f"\n--- sample (temperature {args.temperature}, top-k {args.top_k}) ---")
        out = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed)
        print(byte_tokens_to_text(out))
    elif args.sample_tokens > 0:
        out = model.generate(np.array([0]), args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed)
        print("\n--- sample token ids ---\n", out.tolist())


if __name__ == "__main__":
    main()
