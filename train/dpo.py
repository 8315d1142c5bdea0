"""DPO: tune a model on preference pairs, with LoRA adapters (default) or every parameter.

    python train/dpo.py --out-dir out/dpo                     # the synthetic demo (below)
    python train/dpo.py --base out/sft/model --data pairs.jsonl --lora-rank 8 --out-dir out/dpo
    python train/dpo.py --base model.gguf --data pairs.jsonl --full --beta 0.3 --loss-type ipo
    python train/dpo.py --out-dir out/dpo --resume latest     # continue where it stopped

pairs.jsonl holds {"prompt": ..., "chosen": ..., "rejected": ...} per line: the prompt as
text, or as messages [{"role": "user", "content": ...}] rendered with the tokenizer's chat
template (ChatML when it has none); chosen / rejected as text continuing the prompt, or as
assistant messages (rendered after the prompt: their content and the end-of-turn marker).
Each row (prompt + response) is cut to -T + 1 tokens. The loss counts the responses'
tokens only.

The reference model is the starting model: with LoRA the same weights with the adapters
switched off (no second copy in memory), with --full a frozen second load of --base. Its
log-probabilities are computed once per batch, without recording.

Without --base, the demo: a new tiny GPT-2 (bytes as tokens, saved as OUT/base) on a
synthetic set (written to OUT/pairs.jsonl): the prompt asks to greet or to take leave of a
random name, the chosen answer is the fitting fixed reply (" hello, NAME!" or
" goodbye, NAME!"), the rejected one the other reply, so the model must read the request.

OUT receives log.jsonl + loss.png (the DPO loss; val_loss on the held-out pairs),
metrics.jsonl + rewards.png (TRL's metric names: loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; eval/... on the held-out
pairs) and step_* checkpoints (exact resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nt import align
from nt.io import FormatError
from nt.models import GPT2, GPT2Config
from nt.train_utils import add_finetune_args, add_loop_args, add_run_args, prepare_finetune, resume_path, train

DEMO_PAIRS = 256


def parser() -> argparse.ArgumentParser:
    """The command line (every flag documented: --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    align.set_help(p, "--base", "the model to tune: a training run folder, nt checkpoint folder, .gguf file or "
                                "Hugging Face folder (default: the demo's new tiny GPT-2; resuming: the run's own)")
    p.add_argument("--data", default=None,
                   help=f"preference pairs (JSONL); default: the synthetic demo set ({DEMO_PAIRS} pairs)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last fraction of the pairs held out for evaluation (default 0.1)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how tightly the policy stays near the "
                                                           "reference (default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="conservative DPO: the assumed share of flipped labels, in [0, 0.5] (sigmoid loss; default 0)")
    p.add_argument("--loss-type", choices=align.DPO_LOSS_TYPES, default="sigmoid",
                   help="sigmoid (DPO, default) or ipo (on length-averaged log-probs, as TRL)")
    add_run_args(p)
    add_loop_args(p)
    align.set_help(p, "--batch-size", "preference pairs per micro-batch (2B rows: chosen and rejected; default 16)")
    align.set_help(p, "--seq-len", "tokens per row at most (prompt + response; longer responses are cut; default 48)")
    align.set_help(p, "--eval-batches", "held-out batches of -B pairs per evaluation (default 4)")
    p.set_defaults(steps=40, lr=3e-3, warmup=5, weight_decay=0.0, seq_len=48, eval_every=10, eval_batches=4)
    return p


def demo_base(out_dir: Path, seed: int, dtype) -> Path:
    """The demo's starting model: a new tiny GPT-2 over bytes, saved once as OUT/base."""
    model = GPT2(GPT2Config.preset("tiny", vocab_size=256), dtype=dtype, seed=seed)
    return align.save_demo_base(model, out_dir / "base")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    dtype = np.float32 if args.dtype == "float32" else np.float64
    out = Path(args.out_dir)
    resume = resume_path(args)
    if args.base is None and resume is None:
        args.base = str(demo_base(out, args.seed, dtype))
    data = args.data or align.write_jsonl(out / "pairs.jsonl", align.synthetic_preferences(DEMO_PAIRS, args.seed))
    try:
        model, tokenizer, extra = prepare_finetune(args, resume, dtype)
        if args.seq_len > model.config.block_size:
            raise ValueError(f"-T {args.seq_len} exceeds the model's block_size {model.config.block_size}")
        pairs = align.read_preferences(data, tokenizer, args.seq_len + 1)
        reference = align.reference_for(model, extra)
    except (ValueError, FormatError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    n_val = int(len(pairs) * args.val_fraction)
    train_pairs, val_pairs = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
    print(f"pairs: {len(train_pairs)} train, {len(val_pairs)} held out (from {data})")

    start = align.resumed_step(resume)
    metrics = align.MetricsLog(out, args.grad_accum, start)
    loss_fn = align.DPOLoss(reference, args.beta, args.label_smoothing, args.loss_type, metrics)
    batches = align.PairBatches(train_pairs, args.batch_size, seed=args.seed)
    held_out = val_pairs[:args.eval_batches * args.batch_size]

    def evaluate() -> float:
        """The held-out pairs' DPO loss; their reward accuracy and margin go to metrics.jsonl."""
        mean = align.dpo_evaluate(model, loss_fn, held_out, args.batch_size)
        metrics.write(step=metrics.step, **{f"eval/{key}": value for key, value in mean.items()})
        return mean["loss"]

    train(args, model, batches, loss_fn, evaluate=evaluate if held_out else None, resume=resume, extra=extra)
    png = metrics.plot(["rewards/accuracies", "rewards/margins", "eval/rewards/accuracies"], "rewards")
    print(f"metrics: {metrics.path}" + (f", curve: {png}" if png else ""))
    steps = [e for e in metrics.entries() if "rewards/accuracies" in e]
    if steps:
        print(f"rewards/accuracies by step: " + " ".join(f"{e['step']}:{e['rewards/accuracies']:.2f}" for e in steps))


if __name__ == "__main__":
    main()
