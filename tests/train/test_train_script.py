"""train/train_gpt2.py and train/train_llama.py end to end on tiny models: a run stopped
and resumed logs the same losses as an uninterrupted one, bit for bit (Llama with dropout,
so the tape's RNG counter must come back too)."""
import json
import shutil

import pytest
from helpers import load_script

def script_main(name):
    return load_script(f"train/{name}.py", name).main


@pytest.fixture(scope="module")
def train_main():
    return script_main("train_gpt2")


def log_of(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script,flags", [("train_gpt2", ["--preset", "tiny"]),
                                          ("train_llama", ["--preset", "llama-tiny", "--dropout", "0.1"])])
def test_resume_matches_uninterrupted_run(script, flags, tmp_path, capsys):
    from nt.data import builtin_corpus_text
    train_main = script_main(script)
    text = tmp_path / "data.txt"
    text.write_text(builtin_corpus_text()[:40_000])
    common = flags + ["--data", str(text), "--vocab-size", "300", "-B", "2", "-T", "16",
                      "--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--sample-tokens", "5", "--warmup", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_main(common + ["--out-dir", str(full)])
    train_main(common + ["--out-dir", str(part), "--checkpoint-every", "3", "--keep-last", "0"])
    assert sorted(p.name for p in part.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert (part / "tokenizer" / "merges.txt").exists()
    # make it look like the run died after saving step 3, then resume it
    shutil.rmtree(part / "step_00000006")
    (part / "latest").write_text("step_00000003\n")
    capsys.readouterr()
    train_main(common + ["--out-dir", str(part), "--resume", "latest"])
    assert "resumed from" in capsys.readouterr().out
    ms = lambda log: [{k: v for k, v in e.items() if k != "ms"} for e in log]  # noqa: E731
    expected = ms(log_of(full))
    assert [e["step"] for e in expected] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    assert ms(log_of(part)) == expected  # exact equality of every loss


def test_bad_resume_path(train_main, tmp_path):
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        train_main(["--resume", str(tmp_path), "--tokenizer", "bytes", "--steps", "1"])


def test_grad_accum_trains_on_k_different_micro_batches(train_main, tmp_path, monkeypatch):
    """--grad-accum K: each step's K micro-batches differ, and together they are the batch
    a run with -B B*K reads (the loader reuses its arrays; drawing all K first made them
    K copies of the last one)."""
    import numpy as np
    from nt.models import GPT2
    seen = []
    forward = GPT2.forward

    def recording_forward(self, idx, targets=None):
        if self.training and targets is not None:
            seen.append(idx.copy())
        return forward(self, idx, targets)
    monkeypatch.setattr(GPT2, "forward", recording_forward)
    common = ["--preset", "tiny", "--tokenizer", "bytes", "-T", "16", "--steps", "2", "--eval-every", "0",
              "--sample-tokens", "0", "--seed", "3"]
    train_main(common + ["-B", "2", "--grad-accum", "3", "--out-dir", str(tmp_path / "accum")])
    micro = seen[:]
    seen.clear()
    train_main(common + ["-B", "6", "--out-dir", str(tmp_path / "big")])
    assert len(micro) == 6 and len(seen) == 2
    for step in range(2):
        parts = micro[3 * step:3 * step + 3]
        assert len({p.tobytes() for p in parts}) == 3
        np.testing.assert_array_equal(np.concatenate(parts), seen[step])
