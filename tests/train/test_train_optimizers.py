"""train/train_gpt2.py with --optimizer chuck, --grad-accum and --loss-scale: a run stopped
and resumed logs the same losses as an uninterrupted one (Chuck's state, the loss scaler's
state and the data position all come back), and every optimizer name trains."""
import json
import math
import shutil

import pytest
from helpers import load_script

@pytest.fixture(scope="module")
def train_main():
    return load_script("train/train_gpt2.py", "train_gpt2_optim").main


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    from nt.data import builtin_corpus_text
    text = tmp_path_factory.mktemp("data") / "data.txt"
    text.write_text(builtin_corpus_text()[:20_000])
    return ["--data", str(text), "--tokenizer", "bytes", "--preset", "tiny", "-B", "2", "-T", "16",
            "--eval-every", "0", "--sample-tokens", "0", "--warmup", "1"]


def losses(out_dir):
    return [e["train_loss"] for e in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
            if "train_loss" in e]


def test_chuck_accum_loss_scale_resume_matches(train_main, common, tmp_path):
    flags = common + ["--steps", "4", "--optimizer", "chuck", "--grad-accum", "2", "--loss-scale"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_main(flags + ["--out-dir", str(full)])
    train_main(flags + ["--out-dir", str(part), "--checkpoint-every", "2"])
    state = json.loads((part / "step_00000002" / "state.json").read_text())
    assert state["optimizer"]["type"] == "Chuck" and state["extra"]["scaler"]["total_steps"] == 2
    shutil.rmtree(part / "step_00000004")
    (part / "latest").write_text("step_00000002\n")
    train_main(flags + ["--out-dir", str(part), "--resume", "latest"])
    assert losses(part) == losses(full) and len(losses(full)) == 4


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_every_optimizer_name_trains(train_main, common, tmp_path, name):
    train_main(common + ["--steps", "2", "--optimizer", name, "--out-dir", str(tmp_path)])
    assert all(math.isfinite(v) for v in losses(tmp_path))


def test_bad_grad_accum(train_main, common, tmp_path):
    with pytest.raises(SystemExit, match="grad-accum"):
        train_main(common + ["--steps", "1", "--grad-accum", "0", "--out-dir", str(tmp_path)])
