"""GRPO: tune a model on the rewards of its own samples, with LoRA adapters (default) or
every parameter.

    python train/grpo.py --out-dir out/grpo --full          # the demo (below)
    python train/grpo.py --base out/sft/model --data prompts.jsonl --reward my_rewards.py:correct -T 64
    python train/grpo.py --out-dir out/grpo --full --resume latest

Each step draws -B prompts, samples -G completions of each from the current policy (with
the KV cache, each group in one batch), scores them with the reward functions (their
weighted sum), normalises the rewards within each group into advantages
((r - mean) / (std + 1e-4)), and minimises the clipped policy-ratio loss with the k3 KL
penalty to the reference, summed over every completion token of the batch and divided by
their count (TRL's loss_type "bnpo"). A completion ends at its first --eos token (counted
in the loss) or after -T tokens. The old-policy log-probs are computed by a forward pass
right after sampling, with the weights that sampled (with --num-iterations > 1 the same
sampled batch serves several steps against them); the reference is the starting model
(LoRA: the base with the adapters off; --full: a frozen second load of --base).

prompts.jsonl holds {"prompt": text or messages, ...} per line; the record's other fields
go to every reward function by name, as in TRL: fn(prompts, completions, **fields) -> one
number per completion (a NaN, a non-number or a wrong count is an error naming the function,
the record and the completion).

Without --base, the demo: "a+b=" for every pair of digits, rewarded 1 for the exact sum
(nt.align:exact_match) plus 0.1 for answering with digits (nt.align:digits_only). Its
starting model is a new tiny GPT-2 over bytes after --sft-steps of supervised warm-up on
the answers (saved as OUT/base), which leaves it right about a quarter of the time.

OUT receives metrics.jsonl + rewards.png (TRL's names: reward, reward_std,
rewards/<function>/mean, kl, clip_ratio/region_mean, completions/mean_length, loss; eval/reward of
greedy completions), log.jsonl + loss.png and step_* checkpoints (exact resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nt import align
from nt.io import FormatError
from nt.models import GPT2, GPT2Config
from nt.tokenizer import ByteTokenizer
from nt.train_utils import add_finetune_args, add_loop_args, add_run_args, prepare_finetune, resume_path, train

DEMO_REWARDS = ["nt.align:exact_match", "nt.align:digits_only"]
DEMO_WEIGHTS = [1.0, 0.1]


def parser() -> argparse.ArgumentParser:
    """The command line (every flag documented: --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    align.set_help(p, "--base", "the model to tune: a training run folder, nt checkpoint folder, .gguf file or "
                                "Hugging Face folder (default: the demo's warmed-up tiny GPT-2; resuming: the "
                                "run's own)")
    p.add_argument("--data", default=None, help="prompts (JSONL); default: the demo task, every 'a+b=' of two digits")
    p.add_argument("--reward", action="append", default=None,
                   help="a reward function 'module:function' or 'file.py:function' (repeat for several); "
                        f"default: {' and '.join(DEMO_REWARDS)}")
    p.add_argument("--reward-weights", type=float, nargs="+", default=None,
                   help="one weight per --reward (default: 1 each; the demo's 1 and 0.1)")
    p.add_argument("-G", "--num-generations", type=int, default=8, help="completions per prompt (>= 2; default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0; default 1)")
    p.add_argument("--eos", default="\n", help="the text of the one token that ends a completion (default newline)")
    p.add_argument("--beta", type=float, default=0.04,
                   help="KL coefficient (k3 estimator; 0: no reference model; default 0.04)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range of the policy ratio (default 0.2)")
    p.add_argument("--epsilon-high", type=float, default=None, help="upper clip range (default: --epsilon)")
    p.add_argument("--num-iterations", type=int, default=1,
                   help="optimizer steps (micro-batches) on each sampled batch, the old-policy log-probs kept from "
                        "sampling; above 1 the ratio moves away from 1 and the clip acts (default 1)")
    p.add_argument("--sft-steps", type=int, default=80,
                   help="the demo's supervised warm-up steps on the answers before GRPO (default 80)")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="the demo's warm-up learning rate (default 3e-3)")
    add_run_args(p)
    add_loop_args(p)
    align.set_help(p, "--batch-size", "prompts per micro-batch, each sampled -G times (default 16)")
    align.set_help(p, "--seq-len", "completion length limit in tokens (default 3)")
    align.set_help(p, "--eval-every", "every N steps (and at the start and end), the mean reward of greedy "
                                      "completions of the first --eval-batches x B prompts: eval/reward in "
                                      "metrics.jsonl, its negative as val_loss in log.jsonl (0: never; default 50)")
    align.set_help(p, "--eval-batches", "batches of -B prompts per evaluation (default 2)")
    p.set_defaults(steps=200, lr=2e-3, warmup=5, weight_decay=0.0, batch_size=16, seq_len=3, eval_every=50,
                   eval_batches=2)
    return p


def demo_base(out_dir: Path, args, dtype) -> Path:
    """The demo's starting model, made once: a new tiny GPT-2 over bytes, then --sft-steps of
    supervised training on the answers (the task's format), saved as OUT/base."""
    path = out_dir / "base"
    if (path / "state.json").is_file():
        return path
    model = GPT2(GPT2Config.preset("tiny", vocab_size=256), dtype=dtype, seed=args.seed)
    tok = ByteTokenizer()
    examples = [(p.ids, align.encode(tok, p.fields["answer"] + args.eos))
                for p in align.prompts_from_records(align.sum_task(args.seed), tok, "demo task")]
    losses = align.supervised_warmup(model, examples, args.sft_steps, 32, args.sft_lr, args.seed)
    if losses:
        print(f"supervised warm-up: {args.sft_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return align.save_demo_base(model, path)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    dtype = np.float32 if args.dtype == "float32" else np.float64
    out = Path(args.out_dir)
    resume = resume_path(args)
    if args.base is None and resume is None:
        args.base = str(demo_base(out, args, dtype))
    try:
        model, tokenizer, extra = prepare_finetune(args, resume, dtype)
        prompts = (align.read_prompts(args.data, tokenizer) if args.data
                   else align.prompts_from_records(align.sum_task(args.seed), tokenizer, "demo task"))
        reward_fns = [align.load_reward(spec) for spec in (args.reward or DEMO_REWARDS)]
        weights = args.reward_weights or (DEMO_WEIGHTS if args.reward is None else [1.0] * len(reward_fns))
        eos = align.encode(tokenizer, args.eos)
        if len(eos) != 1:
            raise ValueError(f"--eos {args.eos!r} is {len(eos)} tokens; it must be one")
        reference = align.reference_for(model, extra) if args.beta > 0 else None
        sampler = align.GroupSampler(model, prompts, tokenizer, reward_fns, weights, args.num_generations,
                                     args.batch_size, args.seq_len, int(eos[0]), args.temperature, reference,
                                     args.seed, args.num_iterations)
        per_checkpoint = args.checkpoint_every * args.grad_accum
        if args.checkpoint_every > 0 and (per_checkpoint % args.num_iterations
                                          or args.steps * args.grad_accum % args.num_iterations):
            raise ValueError(f"checkpoints every {args.checkpoint_every} steps of {args.grad_accum} micro-batches "
                             f"(and at step {args.steps}) must fall between sampled batches, each used "
                             f"{args.num_iterations} times: make them multiples")
    except (ValueError, FormatError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")

    metrics = align.MetricsLog(out, args.grad_accum, align.resumed_step(resume))
    loss_fn = align.GRPOLoss(args.beta, args.epsilon, args.epsilon_high, args.temperature, metrics)
    held_out = prompts[:args.eval_batches * args.batch_size]

    def evaluate() -> float:
        reward, by_name = align.greedy_reward(model, tokenizer, held_out, reward_fns, weights, args.seq_len,
                                              int(eos[0]))
        metrics.write(step=metrics.step, **{"eval/reward": reward},
                      **{f"eval/rewards/{name}/mean": value for name, value in by_name.items()})
        return -reward

    train(args, model, sampler, loss_fn, evaluate=evaluate, resume=resume, extra=extra)
    names = [getattr(fn, "__name__", "") for fn in reward_fns]
    png = metrics.plot(["reward"] + [f"rewards/{n}/mean" for n in names] + ["eval/reward"], "rewards")
    print(f"metrics: {metrics.path}" + (f", curve: {png}" if png else ""))
    rewards = [e["reward"] for e in metrics.entries() if "reward" in e]
    if rewards:
        k = max(1, len(rewards) // 10)
        print(f"mean reward: first {k} steps {np.mean(rewards[:k]):.3f}, last {k} steps {np.mean(rewards[-k:]):.3f}")


if __name__ == "__main__":
    main()
