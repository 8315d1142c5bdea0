"""train()'s step makes the clip factor beside the grads (opt.clip_scale) and lets the
update leave the grads zero (step(zero_grad=True)) instead of zero_grad + clip_factor +
step: the same parameters bit for bit and the same logged losses and printed norm as that
loop, with every optimizer and with the loss scaler."""
import argparse
import json
import math

import numpy as np
import pytest

from nt.models import GPT2, GPT2Config
from nt.optim import CosineSchedule, GradScaler, clip_factor, make_optimizer
from nt.train_utils import add_loop_args, add_run_args, train

CFG = GPT2Config.preset("tiny", vocab_size=64, block_size=16)


class Batches:
    """A fixed sequence of random (idx, targets) batches: the smallest BatchSource."""

    def __init__(self, B=2, T=8, seed=0):
        self.rng = np.random.default_rng(seed)
        self.B, self.T = B, T

    def next_batch(self):
        x = self.rng.integers(0, CFG.vocab_size, (self.B, self.T + 1)).astype(np.int32)
        return x[:, :-1], x[:, 1:]

    def state(self):
        return {}

    def set_state(self, state):
        pass


def old_loop(args, model, source):
    """The loop before: zero_grad, forward + backward, the norm read back, then step()."""
    params = model.params
    opt = make_optimizer(args.optimizer, params, args.lr, args.weight_decay)
    schedule = CosineSchedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    scaler = GradScaler(params) if args.loss_scale else None
    losses, norms = [], []
    for step in range(args.steps):
        model.zero_grad()
        loss = model.forward(*source.next_batch())[1]
        losses.append(float(loss.data[0]))
        if scaler is None:
            model.tape.backward(loss)
        else:
            scaler.backward(model.tape, loss)
        finite = scaler.unscale_() if scaler is not None else True
        norm, clip = clip_factor(params, args.grad_clip) if finite else (math.nan, 1.0)
        norms.append(norm)
        kwargs = dict(lr=schedule(step), grad_scale=clip, loss=losses[-1])
        scaler.step(opt, **kwargs) if scaler is not None else opt.step(**kwargs)
    return losses, norms


@pytest.mark.parametrize("flags", [["--optimizer", "adamw"], ["--optimizer", "sgd", "--loss-scale"],
                                   ["--optimizer", "chuck"]])
def test_train_step_equals_zero_grad_clip_factor_step(flags, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_run_args(p)
    add_loop_args(p)
    args = p.parse_args(["--steps", "4", "--warmup", "1", "--lr", "3e-2", "--grad-clip", "3.0", "--eval-every", "0",
                         "--out-dir", str(tmp_path)] + flags)
    ref = GPT2(CFG, seed=1)
    losses, norms = old_loop(args, ref, Batches())
    model = GPT2(CFG, seed=1)
    model.params.grad[:] = 1.0   # stale grads: train() must start from zero
    train(args, model, Batches())
    assert np.array_equal(model.params.flat, ref.params.flat)
    assert not model.params.grad.any()   # the last update left them zero
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["train_loss"] for e in log] == losses
    out = capsys.readouterr().err
    assert f"norm {norms[-1]:.2f}" in out and max(norms) > 3.0  # clipping happened
