"""Train GPT-2 with nt, llm.c-style: built-in corpus (BPE) by default, or your text / shards.

    python train/train_gpt2.py                                  # small GPT on the built-in corpus
    python train/train_gpt2.py --data book.txt --vocab-size 8192 --out-dir out/book
    python train/train_gpt2.py --resume latest --out-dir out/book --data book.txt  # continue
    python train/train_gpt2.py --preset d12 --init-from gpt2_124M.bin --data shard.bin
"""
from __future__ import annotations

import argparse


from nt.io import load_model
from nt.models import GPT2, GPT2Config
from nt.train_utils import add_training_args, prepare_run, pretrain


# With neither -B nor --grad-accum given, a step's 16 sequences run as 8 micro-batches of
# 2: the same tokens and the same updates as one batch of 16 (up to float summation order),
# with an eighth of the activations, so the default run peaks under 250 MB
# (docs/memory.md). Either flag given keeps the plain meaning: -B 16, --grad-accum 1.
BATCH, MICRO_BATCH, EVAL_BATCHES = 16, 2, 8
DEFAULT_HELP = {
    "batch_size": f"sequences per micro-batch (default {BATCH}, or {MICRO_BATCH} x {BATCH // MICRO_BATCH} "
                  f"micro-batches when neither -B nor --grad-accum is given)",
    "grad_accum": "micro-batches of -B sequences per optimizer step (effective batch: grad_accum * B; default 1, "
                  f"or {BATCH // MICRO_BATCH} with -B {MICRO_BATCH} when neither flag is given)",
    "eval_batches": f"validation batches per evaluation (default {EVAL_BATCHES}; in the default run "
                    f"{EVAL_BATCHES * BATCH // MICRO_BATCH} of {MICRO_BATCH}: the same {EVAL_BATCHES * BATCH} sequences)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help=f"model shape: {', '.join(sorted(GPT2Config.PRESETS))}")
    p.add_argument("--init-from", default=None, help="start from an llm.c GPT-2 checkpoint (.bin)")
    p.add_argument("--save", default=None, help="write the final weights as an llm.c checkpoint here")
    add_training_args(p)
    p.set_defaults(batch_size=None, grad_accum=None, eval_batches=None)   # resolved below
    for action in p._actions:   # argparse has no public way to reword a shared flag's help
        action.help = DEFAULT_HELP.get(action.dest, action.help)
    args = p.parse_args(argv)
    micro = args.batch_size is None and args.grad_accum is None
    if micro:
        args.batch_size, args.grad_accum = MICRO_BATCH, BATCH // MICRO_BATCH
    args.batch_size = BATCH if args.batch_size is None else args.batch_size
    args.grad_accum = 1 if args.grad_accum is None else args.grad_accum
    if args.eval_batches is None:   # the default run validates on the same sequences as -B 16
        args.eval_batches = EVAL_BATCHES * BATCH // MICRO_BATCH if micro else EVAL_BATCHES
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype, data, resume = prepare_run(args)
    if resume is not None:
        model = load_model(resume, device=args.device, dtype=dtype)
    elif args.init_from:
        model = GPT2.from_llmc(args.init_from, device=args.device, dtype=dtype)
    else:
        config = GPT2Config.preset(args.preset, vocab_size=data.vocab_size,
                                   block_size=max(args.seq_len, GPT2Config.PRESETS[args.preset].get("block_size", 1024)))
        model = GPT2(config, device=args.device, dtype=dtype, seed=args.seed)
    cfg = model.config
    print(f"model: GPT-2 L={cfg.n_layer} C={cfg.n_embd} NH={cfg.n_head} V={cfg.vocab_size} "
          f"(padded {cfg.padded_vocab_size}) T<={cfg.block_size}: {model.num_params:,} parameters")

    pretrain(args, model, data, resume)
    if args.save:
        model.save_llmc(args.save)
        print(f"saved llm.c checkpoint to {args.save}")


if __name__ == "__main__":
    main()
