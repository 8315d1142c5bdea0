"""Train a LLaMA-family model with nt: built-in corpus (BPE) by default, or your text / shards.

    python train/train_llama.py                              # llama-mini on the built-in corpus
    python train/train_llama.py --preset llama-tiny --steps 50
    python train/train_llama.py --bitnet                     # BitNet b1.58 (ternary weights) llama-mini
    python train/train_llama.py --preset smollm2-135m -B 1 -T 64 --data shard.bin --vocab-size 49152
    python train/train_llama.py --resume latest --out-dir out/llama   # continue where it stopped

The counterpart of train_gpt2.py: the same data, loop, schedule, checkpoint and resume
flags (nt.train_utils), plus the Llama options (dropout, multi-token prediction, label
smoothing, z-loss).
"""
from __future__ import annotations

import argparse
import sys


from nt.io import load_model
from nt.models import Llama, LlamaConfig
from nt.train_utils import add_training_args, prepare_run, pretrain


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-mini", help=f"model shape: {', '.join(sorted(LlamaConfig.PRESETS))}")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--n-predict", type=int, default=1, help="multi-token prediction heads (1 = next token only)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--z-loss", type=float, default=0.0)
    p.add_argument("--bitnet", action="store_true",
                   help="BitNet b1.58: ternary BitLinear projections with 8-bit activations (nt.bitnet)")
    add_training_args(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype, data, resume = prepare_run(args)
    if resume is not None:
        model = load_model(resume, device=args.device, dtype=dtype)
    else:
        if args.preset not in LlamaConfig.PRESETS:
            sys.exit(f"error: unknown preset {args.preset!r}; choose from {sorted(LlamaConfig.PRESETS)}")
        block_size = max(args.seq_len, LlamaConfig.PRESETS[args.preset].get("block_size", 1024))
        cfg = LlamaConfig.preset(args.preset, vocab_size=data.vocab_size, block_size=block_size,
                                 dropout=args.dropout, n_predict=args.n_predict,
                                 label_smoothing=args.label_smoothing, z_loss=args.z_loss, bitnet=args.bitnet)
        model = Llama(cfg, device=args.device, dtype=dtype, seed=args.seed)
    cfg = model.config
    print(f"model: {type(model).__name__}{' (BitNet b1.58)' if cfg.bitnet else ''} L={cfg.n_layers} C={cfg.dim} NH={cfg.n_heads} NKV={cfg.n_kv_heads} "
          f"hs={cfg.hs} H={cfg.ffn_hidden} V={cfg.vocab_size} (padded {cfg.padded_vocab_size}): "
          f"{model.num_params:,} parameters")

    pretrain(args, model, data, resume)


if __name__ == "__main__":
    main()
