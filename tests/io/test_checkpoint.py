"""Checkpoints: exact resume (bit-identical losses), atomic saves that survive a writer
killed mid-save, and clear errors for incomplete or mismatched checkpoints."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nt.data import DataLoader
from nt.io import (FormatError, latest_checkpoint, load_checkpoint, load_model, save_checkpoint,
                   save_run_checkpoint)
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW, CosineSchedule, clip_grad_norm

TOKENS = (np.arange(3000) * 7919 % 97).astype(np.uint16)


def setup(seed=0):
    model = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=16), seed=seed)
    opt = AdamW(model.params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = CosineSchedule(3e-3, warmup=2, total=6)
    loader = DataLoader(TOKENS, B=2, T=16, shuffle=True, seed=5)
    return model, opt, sched, loader


def run(model, opt, sched, loader, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = loader.next_batch()
        _, loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        clip_grad_norm(model.params, 1.0)
        opt.step(sched(step))
        losses.append(float(loss.numpy()[0]))
    return losses


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path):
    full = run(*setup(), 0, 6)
    model, opt, sched, loader = setup()
    first = run(model, opt, sched, loader, 0, 3)
    rng = np.random.default_rng(11)
    rng.random(5)
    save_run_checkpoint(tmp_path, 3, model, opt, schedule=sched, loaders={"train": loader}, rngs={"sample": rng},
                        extra={"note": "hi"})
    del model, opt, loader
    model, opt, sched, loader = setup(seed=123)  # different init: everything must come from the checkpoint
    rng2 = np.random.default_rng(0)
    ck = load_checkpoint(latest_checkpoint(tmp_path), model, opt, schedule=sched, loaders={"train": loader},
                         rngs={"sample": rng2})
    assert ck.step == 3 and ck.extra == {"note": "hi"} and opt.step_count == 3
    assert rng2.random() == rng.random()
    second = run(model, opt, sched, loader, ck.step, 6)
    assert first + second == full  # exact float equality


def test_checkpoint_layout_and_model_rebuild(tmp_path):
    model, opt, *_ = setup()
    path = save_checkpoint(tmp_path / "ck", model, opt, step=7)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    st_numpy = pytest.importorskip("safetensors.numpy")
    weights = st_numpy.load_file(str(path / "model.safetensors"))
    assert weights["qkvw"].shape == (2, 3 * 64, 64) and np.array_equal(weights["wte"], model.params["wte"].numpy())
    again = load_model(path)
    assert again.config == model.config and np.array_equal(again.params.flat, model.params.flat)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_mismatch_and_incomplete_errors(tmp_path):
    model, opt, *_ = setup()
    path = save_checkpoint(tmp_path / "ck", model, opt)
    other = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=32))
    with pytest.raises(FormatError, match="wpe"):
        load_checkpoint(path, other)
    os.remove(path / "state.json")
    with pytest.raises(FormatError, match="state.json: missing"):
        load_checkpoint(path, model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", model)


WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from nt.io import checkpoint
    from nt.models import GPT2, GPT2Config
    from nt.optim import AdamW
    out, kill_after = sys.argv[1], int(sys.argv[2])
    model = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=16), seed=0)
    opt = AdamW(model.params)
    checkpoint.save_run_checkpoint(out, 1, model, opt)          # the last good checkpoint
    model.params.flat[:] += 1.0
    written = []
    def hook(path):
        written.append(path)
        if len(written) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._after_file = hook
    checkpoint.save_run_checkpoint(out, 2, model, opt)
""")


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_writer_killed_mid_save_leaves_last_good_checkpoint(tmp_path, kill_after):
    proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), str(kill_after)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    ck = load_checkpoint(latest)
    assert ck.step == 1
    fresh = GPT2(GPT2Config.preset("tiny", vocab_size=97, block_size=16), seed=0)
    assert np.array_equal(ck.model.params.flat, fresh.params.flat)
    assert not (tmp_path / "step_00000002").exists()
    # the next save cleans the crashed writer's temporary folder up
    save_run_checkpoint(tmp_path, 3, ck.model, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]
