"""Data parallel under `mpiexec -n 2` (the mpich wheel's) on train/train_gpt2.py itself:
2 ranks x B=4 log the losses of 1 rank x B=8 over 10 clipped steps, with and without
ZeRO-1, to 1e-6 (float32) and 1e-12 (float64); checkpoints resume across rank counts; a
rank that dies or raises ends the job with an error within seconds; ranks started with
different settings are refused."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if importlib.util.find_spec("mpi4py") is None or not MPIEXEC.exists():
    pytest.skip("needs mpi4py and the mpich wheel's mpiexec (pip install 'nt[mpi]')", allow_module_level=True)

TIMEOUT = 120   # seconds for one mpiexec run: a hang fails the test instead of CI
STEPS = 10


def mpiexec(*parts, timeout=TIMEOUT):
    """Run `mpiexec PARTS...` (one python command per part, each part -n 1 ...);
    returns the CompletedProcess."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    return subprocess.run([str(MPIEXEC), *parts], capture_output=True, text=True, timeout=timeout, env=env)


def train_args(data, out, dtype, B, *extra):
    return ["--preset", "tiny", "--data", str(data), "--tokenizer", "bytes", "-B", str(B), "-T", "16",
            "--steps", str(STEPS), "--eval-every", "5", "--eval-batches", "2", "--sample-tokens", "0",
            "--warmup", "2", "--lr", "3e-3", "--grad-clip", "0.5", "--dtype", dtype, "--out-dir", str(out), *extra]


def on_ranks(n, args):
    result = mpiexec("-n", str(n), sys.executable, str(ROOT / "train" / "train_gpt2.py"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def in_process(args):
    load_script("train/train_gpt2.py", "train_gpt2").main(args)


def losses(out):
    return [(e["step"], "train_loss" in e, e.get("train_loss", e.get("val_loss")))
            for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def assert_same_losses(got, want, tol):
    assert [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=tol, atol=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 kB of text: words drawn from a small skewed vocabulary (quick to make and to learn)."""
    rng = np.random.default_rng(0)
    words = ["the", "model", "rank", "grad", "step", "of", "and", "a", "loss", "batch", "to", "is", "in", "data"]
    p = 1.0 / np.arange(1, len(words) + 1)
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(" ".join(rng.choice(words, size=14_000, p=p / p.sum())))
    return path


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """name -> run folder, made on first use: 'one' (1 rank, B=8), 'dp' (2 ranks, B=4),
    'zero' (2 ranks, B=4, --zero 1), each with checkpoints at steps 5 and 10."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(name, dtype):
        key = (name, dtype)
        if key not in done:
            out = root / f"{name}_{dtype}"
            ckpt = ["--checkpoint-every", "5", "--keep-last", "0"]
            if name == "one":
                in_process(train_args(data, out, dtype, 8, *ckpt))
            else:
                on_ranks(2, train_args(data, out, dtype, 4, *ckpt, *(["--zero", "1"] if name == "zero" else [])))
            done[key] = out
        return done[key]
    return get


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_two_ranks_match_one_rank_with_twice_the_batch(runs, dtype, tol):
    one = losses(runs("one", dtype))
    assert len(one) == STEPS + 3 and one[-2][2] < one[0][2] - 0.3   # it learns
    for name in ("dp", "zero"):
        assert_same_losses(losses(runs(name, dtype)), one, tol)
    # the ZeRO checkpoint's optimizer state, gathered by rank 0, is the one-rank run's
    from nt.io.safetensors import load_safetensors
    want, _ = load_safetensors(runs("one", dtype) / "step_00000010" / "optimizer.safetensors")
    got, _ = load_safetensors(runs("zero", dtype) / "step_00000010" / "optimizer.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=max(tol * 100, 1e-10) * scale)


def resume_copy(src, dst, step):
    shutil.copytree(src, dst)
    for later in dst.glob("step_*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    (dst / "latest").write_text(f"step_{step:08d}\n")
    return dst


def test_checkpoints_resume_across_rank_counts(runs, data, tmp_path):
    one, zero = runs("one", "float32"), runs("zero", "float32")
    # a 2-rank ZeRO checkpoint continued by 1 rank with B=8
    out = resume_copy(zero, tmp_path / "zero_to_one", 5)
    in_process(train_args(data, out, "float32", 8, "--resume", "latest"))
    assert_same_losses(losses(out), losses(one), 1e-6)
    # a 1-rank checkpoint continued by 2 ranks with ZeRO
    out = resume_copy(one, tmp_path / "one_to_zero", 5)
    on_ranks(2, train_args(data, out, "float32", 4, "--resume", "latest", "--zero", "1"))
    assert_same_losses(losses(out), losses(one), 1e-6)


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_failing_rank_ends_the_job(how):
    t0 = time.perf_counter()   # ~5 s on an idle machine, mostly start-up; generous bounds for a busy one
    result = mpiexec("-n", "2", sys.executable, str(HERE / "worker.py"), "1", how, timeout=120)
    assert result.returncode != 0
    assert time.perf_counter() - t0 < 60
    assert "all steps done" not in result.stdout
    if how == "raise":
        assert "rank 1 of 2 failed (RuntimeError: a failure in the step)" in result.stderr
    else:   # mpiexec names the dead process's PID; rank 0's start-up line maps it to rank 1
        table = dict(re.findall(r"(\d+):(\d+)@", result.stderr))
        dead = re.search(r"PID (\d+) RUNNING AT", result.stdout + result.stderr)
        assert dead is not None and table["1"] == dead.group(1)


def test_ranks_with_different_settings_are_refused(data, tmp_path):
    script = [sys.executable, str(ROOT / "train" / "train_gpt2.py")]
    args = train_args(data, tmp_path / "out", "float32", 4)
    other = [("1e-3" if a == "3e-3" else a) for a in args]
    result = mpiexec("-n", "1", *script, *args, ":", "-n", "1", *script, *other)
    assert result.returncode != 0
    assert "the runs' settings or data differ between ranks: rank(s) [1] do not match rank 0" in result.stderr
    assert not (tmp_path / "out" / "log.jsonl").exists() or not (tmp_path / "out" / "log.jsonl").read_text()
