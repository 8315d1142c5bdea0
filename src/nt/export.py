"""A trained model out of nt in one command, tokenizer included.

    python -m nt export RUN_OR_CHECKPOINT OUT [--to gguf] [--type Q8_0]   # one .gguf file
    python -m nt export RUN_OR_CHECKPOINT OUT --to hf                     # a Hugging Face folder

RUN_OR_CHECKPOINT is a training run folder (a training script's --out-dir: the checkpoint
its `latest` names, and its tokenizer/ folder) or one checkpoint folder (step_XXXXXXXX,
with the tokenizer/ of the run folder around it). A run without a tokenizer folder (bytes
or shards as tokens) is exported without one, with a note. --to gguf writes llama.cpp's
file (nt.models.gguf.write: matrices as --type, tokenizer embedded); --to hf writes
model.save_pretrained's folder plus the tokenizer as GPT-2's vocab.json + merges.txt.
Files are written atomically: a failed export leaves no partial file behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from .io import FormatError, latest_checkpoint, load_model
from .io.gguf import WRITE_TYPES
from .models import gguf
from .tokenizer import BPE

TARGETS = ("gguf", "hf")


def find_checkpoint(path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) for a run folder (its latest checkpoint) or a
    checkpoint folder (its parent is the run). Anything else is a FileNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or checkpoint folder")
    if (path / "config.json").is_file():
        return path, path.parent
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"{path}: no checkpoint here (neither a run folder with a `latest` checkpoint "
                                "nor a checkpoint folder with config.json)")
    return checkpoint, path


def export(source, out, to: str = "gguf", dtype: Optional[str] = None, log: Callable[[str], None] = print) -> Path:
    """Export the model of a run or checkpoint folder (find_checkpoint) with its run's
    tokenizer to `out`: a GGUF file with matrices as `dtype` (to="gguf"; default Q8_0, or
    TQ2_0 for a BitNet model, whose projections are ternary), or a Hugging Face folder
    (to="hf"). Returns `out`; `log` receives the notes and the summary."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if to == "gguf" and dtype is not None and dtype not in WRITE_TYPES:
        raise ValueError(f"--type must be one of {', '.join(WRITE_TYPES)}, got {dtype!r}")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder to write {out.name} in")
    if out.exists() and out.is_dir() != (to == "hf"):
        raise ValueError(f"{out}: exists and is a {'folder' if out.is_dir() else 'file'}; --to {to} writes a "
                         f"{'folder' if to == 'hf' else 'file'}")
    checkpoint, run = find_checkpoint(source)
    model = load_model(checkpoint)
    tokenizer: Optional[BPE] = None
    if (run / "tokenizer").is_dir():
        tokenizer = BPE.load(run / "tokenizer")
    else:
        log(f"note: no tokenizer folder at {run / 'tokenizer'}: exporting without a tokenizer "
            "(token ids only)")
    if to == "gguf":
        if dtype is None:
            dtype = "TQ2_0" if getattr(model.config, "bitnet", False) else "Q8_0"
        gguf.write(out, model, dtype, tokenizer=tokenizer)
        what = f"{dtype} GGUF"
    else:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save(out)
        what = "Hugging Face folder"
    log(f"wrote {out}: {what} of {type(model).__name__} ({model.num_params:,} parameters) from {checkpoint}"
        + (f", tokenizer of {tokenizer.vocab_size} tokens" if tokenizer is not None else ""))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nt export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a training run folder or a checkpoint folder")
    p.add_argument("out", metavar="OUT", help="the .gguf file (--to gguf) or folder (--to hf) to write")
    p.add_argument("--to", choices=TARGETS, default="gguf", help="the format (default: gguf)")
    p.add_argument("--type", choices=WRITE_TYPES, default=None,
                   help="GGUF matrix type (default: Q8_0; TQ2_0 for a BitNet model)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        export(args.source, args.out, args.to, args.type)
    except (OSError, FormatError, ValueError, NotImplementedError) as e:
        print(f"python -m nt export: error: {e}", file=sys.stderr)
        return 1
    return 0
