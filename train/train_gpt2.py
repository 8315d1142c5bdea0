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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help=f"model shape: {', '.join(sorted(GPT2Config.PRESETS))}")
    p.add_argument("--init-from", default=None, help="start from an llm.c GPT-2 checkpoint (.bin)")
    p.add_argument("--save", default=None, help="write the final weights as an llm.c checkpoint here")
    add_training_args(p)
    return p.parse_args(argv)


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
