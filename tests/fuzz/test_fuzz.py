"""Fuzzing every file format nt reads (see tests/fuzz/harness.py for the rule judged).

CI runs a short, fixed campaign per format (the same case seeds every time, so a result
is reproducible); `-m slow` runs a long one from a different seed range:

    pytest tests/fuzz                                   # CI: 250-500 cases per format
    NT_FUZZ_CASES=20000 pytest -m slow tests/fuzz       # long campaign (default 10,000 per format)
    python -m tests.fuzz.run --format gguf --seed 123   # reproduce one reported case

A failing test prints one paragraph per failure class (exception, message, mutations,
the reproducing seed) and keeps every failing case under pytest's tmp_path.
"""
import os

import pytest

from .formats import FORMATS
from .harness import MEM_MB, Worker, judge, run_campaign, summary

# cases per format in CI: sized so all six run in under a minute on two idle cores
CI_CASES = {"llmc": 300, "tokens": 500, "safetensors": 500, "checkpoint": 500, "tokenizer": 250, "gguf": 300}
SLOW_START = 1_000_000   # long campaigns use other seeds than CI's


def fail_on(report, tmp_path) -> None:
    """Fail with one paragraph per failure class (not pytest's repr of the whole report)."""
    if report.failures:
        pytest.fail(report.describe_failures() + f"\nfailing cases saved under {tmp_path / 'failures'}", pytrace=False)


def test_harness_catches_memory_crash_and_hang(tmp_path):
    """The harness itself: the worker's address-space cap turns a huge allocation into a
    MemoryError (and the worker lives on), a segfault is reported as a crash, a hang as a
    timeout, and a fresh worker is started after each."""
    worker = Worker("tokens", tmp_path)
    try:
        out = judge(worker.request({"probe": "alloc", "mb": MEM_MB + 512}))
        assert (out.kind, out.label) == ("fail", "MemoryError")
        assert worker.proc is not None and worker.starts == 1   # an exception does not kill it
        out = judge(worker.request({"probe": "segv"}))
        assert (out.kind, out.label) == ("fail", "crash SIGSEGV") and worker.proc is None
        # a fresh worker's first request gets a long grace (JIT warm-up): spend it on a
        # small allocation, so the hang meets the short timeout
        assert judge(worker.request({"probe": "alloc", "mb": 1})).kind == "ok"
        out = judge(worker.request({"probe": "hang"}, timeout=2))
        assert (out.kind, out.label) == ("fail", "timeout") and worker.proc is None
        assert worker.starts == 2   # the hang ran in the worker started after the crash
    finally:
        worker.stop()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fuzz_campaign(fmt, tmp_path):
    report = run_campaign(fmt, range(CI_CASES[fmt]), tmp_path)
    print(summary([report]))
    assert report.cases == CI_CASES[fmt]
    fail_on(report, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fuzz_long_campaign(fmt, tmp_path):
    n = int(os.environ.get("NT_FUZZ_CASES", 10_000))
    start = int(os.environ.get("NT_FUZZ_START", SLOW_START))
    jobs = int(os.environ.get("NT_FUZZ_JOBS", 2))
    report = run_campaign(fmt, range(start, start + n), tmp_path, jobs=jobs, progress=True)
    print(summary([report]))
    fail_on(report, tmp_path)
