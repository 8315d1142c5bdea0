"""benchmarks/bench_train_cuda.py without a GPU: its arguments, MFU arithmetic and the
--device cuda hook of bench_train.py (the timed runs need a GPU)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_train  # noqa: E402
import bench_train_cuda as btc  # noqa: E402


def test_configs_parse_and_bad_ones_are_refused():
    assert btc.parse_config("d12:16:1024") == ("d12", 16, 1024)
    for bad in ("d12:16", "d12:x:1024", "d12:0:1024", "d12:16:1024:1"):
        with pytest.raises(ValueError, match="preset:B:T"):
            btc.parse_config(bad)
    with pytest.raises(SystemExit):
        btc.parse_args(["--configs", "d12:16"])
    with pytest.raises(SystemExit):
        btc.parse_args(["--steps", "0"])
    args = btc.parse_args([])
    assert args.configs == ["d12:16:1024", "d12:32:1024", "d12:64:1024"] and args.frameworks == list(btc.FRAMEWORKS)
    args = btc.parse_args(["--frameworks", "nt-bf16", "nt", "--out", "rows.json"])   # gpu_check.sh's speed stage
    assert args.frameworks == ["nt-bf16", "nt"] and args.out == "rows.json"


def test_bench_train_hands_device_cuda_over():
    with pytest.raises(SystemExit):            # bench_train_cuda's parser saw the bad config
        bench_train.main(["--device", "cuda", "--configs", "d12:16"])


def test_peak_and_mfu_arithmetic():
    assert btc.peak_tflops("NVIDIA H200") == 989.4
    assert btc.peak_tflops("NVIDIA H100 PCIe") == 756.0         # the longer key wins
    assert btc.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert btc.peak_tflops("Some GPU") == 0.0 and btc.peak_tflops("Some GPU", 100.0) == 100.0
    assert btc.mfu(5e14, 1.0, 1000.0) == pytest.approx(0.5)
    assert btc.mfu(5e14, 1.0, 0.0) == 0.0
    row = btc.summarise("nt", "d12:16:1024", 4e14, [0.5, 0.4, 2.0], 1000.0, 16, 1024, 123.0, 3.2)
    assert row["step_ms"] == pytest.approx(500.0)                 # the median step
    assert row["tokens_per_s"] == pytest.approx(16 * 1024 / 0.5)
    assert row["mfu"] == pytest.approx(0.8)
    # nanoGPT's estimate for GPT-2 124M at T=1024: about 6 * 124M + 12 * 12 * 768 * 1024 FLOPs per token
    cfg = bench_train.make_config("d12", 1024)
    per_token = bench_train.flops_per_step(cfg, 1, 1024) / 1024
    assert 8.5e8 < per_token < 9.0e8
