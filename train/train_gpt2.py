"""Train GPT-2 with nt, llm.c-style: built-in corpus (BPE) by default, or your text / shards.

    python train/train_gpt2.py                                  # small GPT on the built-in corpus
    python train/train_gpt2.py --data book.txt --vocab-size 8192 --out-dir out/book
    python train/train_gpt2.py --resume latest --out-dir out/book    # continue where it stopped
    python train/train_gpt2.py --preset d12 --init-from gpt2_124M.bin --data shard.bin
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from nt.data import DataLoader
from nt.io import load_checkpoint, load_model, save_run_checkpoint
from nt.models import GPT2, GPT2Config
from nt.optim import OPTIMIZERS, Chuck, CosineSchedule, GradScaler, accumulate_grads, clip_grad_norm, make_optimizer
from nt.train_utils import LossLog, add_data_args, add_run_args, load_data, progress, resume_path, unigram_loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help=f"model shape: {', '.join(sorted(GPT2Config.PRESETS))}")
    add_data_args(p)
    add_run_args(p)
    p.add_argument("--init-from", default=None, help="start from an llm.c GPT-2 checkpoint (.bin)")
    p.add_argument("--save", default=None, help="write the final weights as an llm.c checkpoint here")
    p.add_argument("-B", "--batch-size", type=int, default=16)
    p.add_argument("-T", "--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
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
    p.add_argument("--prompt", default="The ")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = np.float32 if args.dtype == "float32" else np.float64

    # ---------------------------------------------------------------- data
    data = load_data(args)
    n_train, n_val = sum(len(t) for t in data.train), sum(len(t) for t in data.val)
    print(f"data: {n_train:,} train / {n_val:,} val tokens, vocab {data.vocab_size}")

    # ---------------------------------------------------------------- model
    resume = resume_path(args)
    if resume is not None:
        model = load_model(resume, device=args.device, dtype=dtype)
    elif args.init_from:
        model = GPT2.from_llmc(args.init_from, device=args.device, dtype=dtype)
    else:
        config = GPT2Config.preset(args.preset, vocab_size=data.vocab_size,
                                   block_size=max(args.seq_len, GPT2Config.PRESETS[args.preset].get("block_size", 1024)))
        model = GPT2(config, device=args.device, dtype=dtype, seed=args.seed)
    cfg = model.config
    if cfg.vocab_size < data.vocab_size:
        sys.exit(f"error: model vocab {cfg.vocab_size} < data vocab {data.vocab_size}")
    if args.seq_len > cfg.block_size:
        sys.exit(f"error: -T {args.seq_len} exceeds the model's block_size {cfg.block_size}")
    print(f"model: GPT-2 L={cfg.n_layer} C={cfg.n_embd} NH={cfg.n_head} V={cfg.vocab_size} "
          f"(padded {cfg.padded_vocab_size}) T<={cfg.block_size}: {model.num_params:,} parameters")

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
        restored = load_checkpoint(resume, model, optimizer, loaders={"train": train_loader})
        start = restored.step
        if scaler is not None and "scaler" in restored.extra:
            scaler.load_state_dict(restored.extra["scaler"])
        print(f"resumed from {resume} at step {start}")
    log = LossLog(args.out_dir, start if resume is not None else None)

    def evaluate() -> float:
        val_loader.set_state({"epoch": 0, "position": 0})
        n = min(args.eval_batches, val_loader.batches_per_epoch)
        return sum(model(*val_loader.next_batch())[1] for _ in range(n)) / n

    def checkpoint(step: int) -> None:
        path = save_run_checkpoint(args.out_dir, step, model, optimizer, keep_last=args.keep_last,
                                   loaders={"train": train_loader}, schedule=schedule,
                                   extra={"scaler": scaler.state_dict()} if scaler is not None else None)
        print(f"\nsaved checkpoint {path}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- train
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
        loss_value = accumulate_grads(model, [train_loader.next_batch() for _ in range(args.grad_accum)], scaler)
        finite = scaler.unscale_() if scaler is not None else True  # grads /= loss scale, inf/nan check
        norm = clip_grad_norm(model.params, args.grad_clip) if args.grad_clip > 0 and finite else float("nan")
        lr = schedule(step)
        step_args = {"lr": lr, **({"loss": loss_value} if isinstance(optimizer, Chuck) else {})}
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

    if args.save:
        model.save_llmc(args.save)
        print(f"saved llm.c checkpoint to {args.save}")

    # ---------------------------------------------------------------- sample
    if args.sample_tokens > 0:
        prompt = data.encode(args.prompt) if data.tokenizer is not None or data.is_bytes else np.array([0])
        out = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed)
        text = data.decode(out)
        print(f"\n--- sample (temperature {args.temperature}, top-k {args.top_k}) ---")
        print(text if text is not None else out.tolist())


if __name__ == "__main__":
    main()
