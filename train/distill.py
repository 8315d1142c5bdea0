"""Distil a larger nt model (the teacher) into a smaller one on the built-in corpus.

    python train/distill.py --out-dir out/distill                          # trains a GPT-2 mini teacher first
    python train/distill.py --teacher out/base --preset tiny --temperature 2 --alpha 0.5
    python train/distill.py --arch llama --teacher out/llama --out-dir out/dl
    python train/distill.py --out-dir out/distill --resume latest           # continue the student's run

--teacher is a training run folder (its latest checkpoint), an nt checkpoint folder, a
.gguf file or a Hugging Face folder; without one, a teacher of --teacher-preset is trained
for --teacher-steps steps into OUT/teacher first (pretraining, same data and flags). The
student (--arch, --preset) learns loss = alpha * KL + (1 - alpha) * CE (nt.distill): KL to
the teacher's softened distributions at --temperature, CE on the next tokens. Teacher and
student share the data's tokenizer: a teacher with another vocabulary is refused. Data
flags as in train_gpt2.py (default: the built-in corpus, BPE 4096); the log, checkpoints
and resume work as there, the val loss being the student's cross-entropy.

Measured (built-in corpus, BPE 4096, B=16, T=64, lr 2e-3, seed 0): teacher = the GPT-2 mini
of `train_gpt2.py --steps 200 --checkpoint-every 200 --out-dir out/base` (4.27M parameters,
val loss 5.92); student GPT-2 tiny (0.37M), `--teacher out/base --steps 200`: val loss
8.31 -> 6.64 (step 50) -> 6.07 (200) with --alpha 0.5 --temperature 2, against 6.68 -> 6.29
for the same student on the cross-entropy alone (--alpha 0).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from nt.distill import check_same_vocabulary, distill_loss
from nt.io import FormatError, load_model
from nt.io.checkpoint import checkpoint_state
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.train_utils import (add_data_args, add_loop_args, add_run_args, check_fits, load_pretrained, prepare_run,
                            pretrain, token_loaders, train)

# --arch -> (model class, config class, default student preset, default teacher preset)
ARCHS = {"gpt2": (GPT2, GPT2Config, "tiny", "mini"), "llama": (Llama, LlamaConfig, "llama-tiny", "llama-mini")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="the teacher model (default: train one, see --teacher-steps)")
    p.add_argument("--teacher-preset", default=None, help="shape of a teacher trained here (default: mini / llama-mini)")
    p.add_argument("--teacher-steps", type=int, default=300, help="steps of a teacher trained here (default 300)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="gpt2", help="the student's (and a trained teacher's) family")
    p.add_argument("--preset", default=None, help="the student's shape (default: tiny / llama-tiny)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term; 1 - alpha weighs the CE (default 0.5)")
    add_data_args(p)
    add_run_args(p)
    add_loop_args(p)
    p.set_defaults(steps=300, eval_every=50)
    return p


def new_model(args, vocab_size: int, preset: str, dtype):
    """A fresh model of --arch and `preset` for `vocab_size` tokens and -T positions."""
    cls, config_cls, _, _ = ARCHS[args.arch]
    if preset not in config_cls.PRESETS:
        raise ValueError(f"unknown {args.arch} preset {preset!r}; choose from {sorted(config_cls.PRESETS)}")
    block_size = max(args.seq_len, config_cls.PRESETS[preset].get("block_size", 1024))
    config = config_cls.preset(preset, vocab_size=vocab_size, block_size=block_size)
    return cls(config, device=args.device, dtype=dtype, seed=args.seed)


def teacher_of(args, data, resume, dtype):
    """The teacher (eval mode) and where it came from: --teacher, the resumed run's, or
    one pretrained now into OUT/teacher."""
    source = args.teacher or (checkpoint_state(resume)["extra"].get("teacher") if resume is not None else None)
    if source is None:
        targs = copy.copy(args)
        targs.out_dir = str(Path(args.out_dir) / "teacher")
        targs.steps = targs.checkpoint_every = args.teacher_steps
        targs.sample_tokens, targs.resume = 0, None
        teacher = new_model(targs, data.vocab_size, args.teacher_preset or ARCHS[args.arch][3], dtype)
        print(f"training a teacher of {teacher.num_params:,} parameters for {args.teacher_steps} steps into {targs.out_dir}")
        pretrain(targs, teacher, data)
        if data.tokenizer is not None:   # a run folder that serves as --teacher on its own later
            data.tokenizer.save(Path(targs.out_dir) / "tokenizer")
        source = targs.out_dir
    pre = load_pretrained(source, device=args.device, dtype=dtype)
    return pre.model.eval(), pre


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    dtype, data, resume = prepare_run(args)
    try:
        if resume is not None:
            student = load_model(resume, device=args.device, dtype=dtype)
        else:
            student = new_model(args, data.vocab_size, args.preset or ARCHS[args.arch][2], dtype)
        teacher, pre = teacher_of(args, data, resume, dtype)
        check_same_vocabulary(teacher, student, pre.tokenizer if data.tokenizer is not None else None, data.tokenizer)
        loss_fn = distill_loss(teacher, args.temperature, args.alpha)
    except (ValueError, FormatError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    check_fits(student, data.vocab_size, args.seq_len)
    check_fits(teacher, data.vocab_size, args.seq_len)
    print(f"teacher: {teacher.num_params:,} parameters ({pre.source}); student: {student.num_params:,}")
    train_loader, evaluate = token_loaders(args, data, student)
    print(f"teacher val loss: {token_loaders(args, data, teacher)[1]():.4f}")
    train(args, student, train_loader, loss_fn, evaluate=evaluate, resume=resume, extra={"teacher": str(pre.source)})


if __name__ == "__main__":
    main()
