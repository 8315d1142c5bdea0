"""Train a LLaMA-family model with nt: built-in corpus by default, or your text / llm.c shards.

    python train/train_llama.py                              # llama-mini on the built-in corpus
    python train/train_llama.py --preset llama-tiny --steps 50
    python train/train_llama.py --preset smollm2-135m -B 1 -T 64 --data shard.bin --vocab-size 49152

The counterpart of train_gpt2.py: the same data, loop, schedule and flags, plus the
Llama options (dropout, multi-token prediction, label smoothing, z-loss).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from nt.data import BYTE_VOCAB, DataLoader, builtin_corpus, byte_tokens_to_text, text_to_byte_tokens
from nt.models import Llama, LlamaConfig
from nt.optim import AdamW, CosineSchedule, clip_grad_norm
from train_gpt2 import load_tokens, progress, unigram_loss  # the sibling script's data helpers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-mini", help=f"model shape: {', '.join(sorted(LlamaConfig.PRESETS))}")
    p.add_argument("--data", nargs="*", default=None,
                   help="training text files (.txt, bytes as tokens) or llm.c token shards (.bin); "
                        "default: the built-in corpus")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of .bin shards (default: 50257 for shards, 256 for text)")
    p.add_argument("-B", "--batch-size", type=int, default=16)
    p.add_argument("-T", "--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--n-predict", type=int, default=1, help="multi-token prediction heads (1 = next token only)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--z-loss", type=float, default=0.0)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = np.float32 if args.dtype == "float32" else np.float64

    # ---------------------------------------------------------------- data
    if args.data:  # like train_gpt2.py: text files are bytes as tokens, .bin files llm.c shards
        has_shards = any(Path(p).suffix == ".bin" for p in args.data)
        vocab_size = args.vocab_size or (50257 if has_shards else BYTE_VOCAB)
        tokens = load_tokens(args.data, vocab_size)
        split = int(len(tokens) * 0.95)
        train_tokens, val_tokens, is_bytes = tokens[:split], tokens[split:], not has_shards
    else:
        (train_tokens, val_tokens), vocab_size, is_bytes = builtin_corpus(), BYTE_VOCAB, True
    print(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, vocab {vocab_size}")

    # ---------------------------------------------------------------- model
    if args.preset not in LlamaConfig.PRESETS:
        sys.exit(f"error: unknown preset {args.preset!r}; choose from {sorted(LlamaConfig.PRESETS)}")
    block_size = max(args.seq_len, LlamaConfig.PRESETS[args.preset].get("block_size", 1024))
    cfg = LlamaConfig.preset(args.preset, vocab_size=vocab_size, block_size=block_size, dropout=args.dropout,
                             n_predict=args.n_predict, label_smoothing=args.label_smoothing, z_loss=args.z_loss)
    model = Llama(cfg, device=args.device, dtype=dtype, seed=args.seed)
    print(f"model: {args.preset} L={cfg.n_layers} C={cfg.dim} NH={cfg.n_heads} NKV={cfg.n_kv_heads} "
          f"hs={cfg.hs} H={cfg.ffn_hidden} V={cfg.vocab_size} (padded {cfg.padded_vocab_size}): "
          f"{model.num_params:,} parameters")

    B, T = args.batch_size, args.seq_len
    train_loader = DataLoader(train_tokens, B, T, shuffle=True, seed=args.seed, vocab_size=cfg.vocab_size)
    val_loader = DataLoader(val_tokens, B, T, vocab_size=cfg.vocab_size)
    baseline = unigram_loss(np.asarray(train_tokens), np.asarray(val_tokens), cfg.vocab_size)
    print(f"unigram baseline val loss: {baseline:.4f}   uniform: {math.log(cfg.vocab_size):.4f}")

    optimizer = AdamW(model.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    schedule = CosineSchedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)

    def evaluate() -> float:
        model.eval()
        val_loader.set_state({"epoch": 0, "position": 0})
        n = min(args.eval_batches, val_loader.batches_per_epoch)
        loss = sum(model(*val_loader.next_batch())[1] for _ in range(n)) / n
        model.train()
        return loss

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

    # ---------------------------------------------------------------- sample
    if args.sample_tokens > 0:
        prompt = text_to_byte_tokens(args.prompt) if is_bytes else np.array([0])
        out = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed)
        print(f"\n--- sample (temperature {args.temperature}, top-k {args.top_k}) ---")
        print(byte_tokens_to_text(out) if is_bytes else out.tolist())


if __name__ == "__main__":
    main()
