"""train/train_gpt2.py's default batch: with neither -B nor --grad-accum, a step's 16
sequences run as 8 micro-batches of 2 (the default run's memory, docs/memory.md), and that
run logs the losses a -B 16 run logs, up to float summation order (float64 here)."""
import json

import pytest
from helpers import load_script

@pytest.fixture(scope="module")
def script():
    return load_script("train/train_gpt2.py", "train_gpt2_default")


@pytest.mark.parametrize("flags,expected", [
    ([], (2, 8, 64)),                                   # the default run: 8 x 2, the same 128 val sequences
    (["-B", "8"], (8, 1, 8)),                           # either flag given: its plain meaning
    (["--grad-accum", "2"], (16, 2, 8)),
    (["-B", "4", "--eval-batches", "3"], (4, 1, 3)),
])
def test_default_batch(script, flags, expected):
    args = script.parse_args(flags)
    assert (args.batch_size, args.grad_accum, args.eval_batches) == expected


@pytest.mark.slow   # ~20 s on a loaded 2-core machine; accumulation itself: tests/optim/test_training_utils.py
def test_default_run_logs_the_losses_of_one_batch_of_16(script, tmp_path):
    from nt.data import builtin_corpus_text
    text = tmp_path / "data.txt"
    text.write_text(builtin_corpus_text()[:80_000])   # 5% val: over 128 windows of 17
    common = ["--data", str(text), "--tokenizer", "bytes", "--preset", "tiny", "-T", "16", "--steps", "3",
              "--eval-every", "3", "--sample-tokens", "0", "--warmup", "1", "--dtype", "float64"]
    script.main(common + ["--out-dir", str(tmp_path / "micro")])
    script.main(common + ["-B", "16", "--eval-batches", "8", "--out-dir", str(tmp_path / "big")])
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("micro", "big")]
    keys = lambda log: [(e["step"], sorted(k for k in e if k.endswith("loss"))) for e in log]  # noqa: E731
    assert keys(logs[0]) == keys(logs[1]) and len(logs[0]) == 5   # val 0, train 1-3, val 3
    for micro, big in zip(*logs):
        for k in ("train_loss", "val_loss"):
            if k in big:
                assert micro[k] == pytest.approx(big[k], rel=0, abs=1e-10)


def test_bench_memory_measures_the_default_run(script):
    """benchmarks/bench_memory.py's `default` config is the batch the default command runs."""
    bench = load_script("benchmarks/bench_memory.py", "bench_memory")
    args, c = script.parse_args([]), bench.CONFIGS["default"]
    assert (c["preset"], c["B"], c["grad_accum"], c["T"]) == (args.preset, args.batch_size, args.grad_accum,
                                                              args.seq_len)
