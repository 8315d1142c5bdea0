"""Distillation: the teacher's no-recording forward, the mixed loss against NumPy, and
train/distill.py end to end (a teacher trained first, the student's loss falling, exact
resume with the teacher found from the checkpoint, a teacher of another vocabulary refused)."""
import json
import shutil

import numpy as np
import pytest

from nt.distill import distill_loss
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from helpers import load_script

@pytest.fixture(scope="module")
def distill():
    return load_script("train/distill.py", "distill").main


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_forward_inference_records_nothing_and_matches_forward():
    model = Llama(LlamaConfig.preset("llama-tiny", vocab_size=64), seed=0)
    idx = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
    want = model(idx)[0].copy()
    got = model.forward_inference(idx)
    assert model.tape.records == [] and not model.tape.recording
    np.testing.assert_array_equal(got.numpy()[..., :64], want)


def test_distill_loss_mixes_kl_and_cross_entropy():
    V, T, alpha = 64, 2.0, 0.3
    teacher = GPT2(GPT2Config.preset("tiny", vocab_size=V, n_embd=64), dtype=np.float64, seed=1).eval()
    student = GPT2(GPT2Config.preset("tiny", vocab_size=V, n_embd=32), dtype=np.float64, seed=2)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, (2, 10), dtype=np.int32)
    targets = np.roll(idx, -1, axis=1)
    targets[:, -1] = -1
    loss = distill_loss(teacher, T, alpha)(student, (idx, targets)).numpy()[0]   # read before the next forward
    zt = teacher(idx)[0].copy()
    zs = student(idx)[0]
    keep = targets >= 0
    pt = np.exp(log_softmax(zt / T))
    kl = (pt * (log_softmax(zt / T) - log_softmax(zs / T))).sum(-1)[keep].mean() * T * T
    ce = -np.take_along_axis(log_softmax(zs), np.maximum(targets, 0)[..., None], -1)[..., 0][keep].mean()
    assert loss == pytest.approx(alpha * kl + (1 - alpha) * ce, rel=1e-10)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from nt.data import builtin_corpus_text
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(builtin_corpus_text()[:30_000])
    return path


def log_of(out):
    return [{k: v for k, v in json.loads(line).items() if k != "ms"} for line in (out / "log.jsonl").read_text().splitlines()]


def test_distill_script_trains_resumes_and_refuses_other_vocabularies(distill, text, tmp_path):
    common = ["--data", str(text), "--vocab-size", "300", "-B", "4", "-T", "32", "--steps", "6", "--warmup", "2",
              "--teacher-preset", "tiny", "--teacher-steps", "8", "--eval-every", "3", "--eval-batches", "2",
              "--temperature", "2", "--alpha", "0.7"]
    full, part = tmp_path / "full", tmp_path / "part"
    distill(common + ["--out-dir", str(full)])
    log = log_of(full)
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.3
    teacher = full / "teacher"
    assert (teacher / "tokenizer" / "merges.txt").exists() and (teacher / "step_00000008").is_dir()

    distill(common + ["--out-dir", str(part), "--teacher", str(teacher), "--checkpoint-every", "3", "--keep-last", "0"])
    assert log_of(part) == log
    shutil.rmtree(part / "step_00000006")
    (part / "latest").write_text("step_00000003\n")
    distill(common + ["--out-dir", str(part), "--resume", "latest"])   # the teacher comes from the checkpoint
    assert log_of(part) == log

    with pytest.raises(SystemExit, match="one vocabulary"):
        distill(common[:2] + ["--tokenizer", "bytes"] + common[4:] + ["--teacher", str(teacher),
                                                                      "--out-dir", str(tmp_path / "bytes")])
