"""Campaigns: build cases from seeds, run them in capped worker processes, judge outcomes.

The rule every loader must keep (DESIGN.md, "Hostile input"): given any file it either
loads it with finite, validated values, or raises nt.io.FormatError or ValueError with a
message. So an outcome is

    ok     the entry point and the format's checks passed;
    error  FormatError, or exactly ValueError, with a non-empty message;
    fail   anything else: another exception type (TypeError, KeyError, MemoryError,
           UnicodeDecodeError, ...), an `Invalid` check, an empty message, a crash
           (segfault, abort) or a timeout.

One worker per format (per job) is started once and fed case after case; it is
restarted after every fail but `Invalid` (see run_campaign), so a process that an
exception, a crash or a hang may have left in a bad state never judges the next case.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .formats import DIRECTORY, FORMATS, Seed

MEM_MB = int(os.environ.get("NT_FUZZ_MEM_MB", 2048))   # nt + numba import peaks near 620 MB
CASE_TIMEOUT = float(os.environ.get("NT_FUZZ_TIMEOUT", 10))
START_TIMEOUT = 180.0        # importing nt in a worker (slow only on a loaded machine)
FIRST_CASE_TIMEOUT = 120.0   # a cold numba cache compiles kernels on a worker's first load
SAVED_PER_CLASS = 20         # failing cases kept on disk per failure class

PACKAGE = __package__   # "fuzz" under pytest, "tests.fuzz" under python -m tests.fuzz.run
PACKAGE_ROOT = Path(__file__).resolve().parents[len(PACKAGE.split("."))]


# ====================================================================== cases

@dataclass
class Case:
    fmt: str
    seed: int
    base: str        # the name of the valid seed it was made from
    files: dict      # relative path -> bytes, None (deleted) or DIRECTORY
    params: dict
    notes: list


_SEEDS: dict = {}
_SEEDS_LOCK = threading.Lock()


def seeds_for(fmt: str) -> list:
    """The valid seeds of a format, made once per process."""
    with _SEEDS_LOCK:
        if fmt not in _SEEDS:
            _SEEDS[fmt] = FORMATS[fmt].seeds()
        return _SEEDS[fmt]


def build_case(fmt: str, seed: int) -> Case:
    """Case number `seed` of a format: the same bytes on every run and machine."""
    seeds = seeds_for(fmt)
    rng = np.random.default_rng([seed, zlib.crc32(fmt.encode())])
    base: Seed = seeds[int(rng.integers(len(seeds)))]
    files, notes = FORMATS[fmt].mutate(rng, base, seeds)
    return Case(fmt, seed, base.name, files, base.params, notes)


def seed_case(fmt: str, index: int) -> Case:
    """Valid seed `index`, unmutated: it must load (a check of the checks themselves)."""
    base = seeds_for(fmt)[index]
    return Case(fmt, -1 - index, base.name, dict(base.files), base.params, ["unmutated seed"])


def write_case(folder: Path, files: dict) -> None:
    """Lay the case out in `folder` (emptied first)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == DIRECTORY:
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)


# ====================================================================== worker process

class Worker:
    """A worker subprocess for one format, with a per-case timeout and crash detection."""

    def __init__(self, fmt: str, log_dir: Path, mem_mb: int = MEM_MB):
        self.fmt, self.mem_mb = fmt, mem_mb
        self.log_path = Path(log_dir) / f"worker-{fmt}-{threading.get_ident()}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.buf = b""
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", f"{PACKAGE}.worker", self.fmt, str(self.mem_mb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, bufsize=0)
        self.buf = b""
        self.starts += 1
        self.answered = 0
        reply = self._read(START_TIMEOUT)
        if reply.get("status") != "ready":
            raise RuntimeError(f"fuzz worker for {self.fmt} did not start: {reply}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.log.close()
            self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _read(self, timeout: float) -> dict:
        """The next reply line, or a crash/timeout status (the process is then dead)."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    return {"status": "timeout", "message": f"no answer within {timeout:.0f} s"}
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    rc = self.proc.wait()
                    tail = self.log_tail()
                    self.stop()
                    name = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
                    return {"status": "crash", "type": name, "message": f"worker died ({name})", "traceback": tail}
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, folder: Path, params: dict, timeout: float = CASE_TIMEOUT) -> dict:
        """Run one case in the worker (started if needed): its reply, or a crash/timeout status."""
        return self.request({"folder": str(folder), "params": params}, timeout)

    def request(self, message: dict, timeout: float = CASE_TIMEOUT) -> dict:
        if self.proc is None:
            self.start()
        if self.answered == 0:
            # a fresh worker's first case may compile kernels (numba's cache is stale
            # whenever nt's source changed): that is not the case hanging
            timeout = max(timeout, FIRST_CASE_TIMEOUT)
        self.answered += 1
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
        except BrokenPipeError:
            self.stop()
            return {"status": "crash", "type": "broken pipe", "message": "worker gone before the case", "traceback": ""}
        return self._read(timeout)


# ====================================================================== judging

@dataclass
class Outcome:
    kind: str        # "ok", "error" or "fail"
    label: str       # exception type, "crash SIGSEGV", "timeout", "Invalid", ...
    message: str = ""
    where: str = ""
    traceback: str = ""


def judge(reply: dict) -> Outcome:
    status = reply.get("status")
    if status == "ok":
        return Outcome("ok", "ok")
    msg, where, tb = reply.get("message", ""), reply.get("where", ""), reply.get("traceback", "")
    if status == "timeout":
        return Outcome("fail", "timeout", msg)
    if status == "crash":
        return Outcome("fail", f"crash {reply.get('type')}", msg, "", tb)
    category, etype = reply.get("category"), reply.get("type", "?")
    if category in ("format_error", "value_error"):
        if msg.strip():
            return Outcome("error", etype, msg, where)
        return Outcome("fail", f"{etype} with an empty message", msg, where, tb)
    return Outcome("fail", etype, msg, where, tb)


def failure_key(fmt: str, out: Outcome) -> tuple:
    """Failures of one class share format, label, nt location and message shape (paths and
    numbers blanked), so 10,000 cases do not print 500 copies of one bug."""
    msg = re.sub(r"/\S*?/case\d*", "<case>", out.message.splitlines()[0] if out.message else "")
    msg = re.sub(r"\d+", "N", msg)[:120]
    return (fmt, out.label, out.where, msg)


# ====================================================================== campaigns

@dataclass
class Failure:
    case: Case
    outcome: Outcome
    saved: Optional[Path] = None

    def describe(self) -> str:
        c, o = self.case, self.outcome
        lines = [f"[{c.fmt}] case seed {c.seed} (from seed file {c.base!r}): {o.label}: {o.message[:500]}",
                 f"  mutations: {'; '.join(c.notes)}",
                 f"  where: {o.where or '-'}",
                 f"  reproduce: python -m tests.fuzz.run --format {c.fmt} --seed {c.seed}"]
        if self.saved:
            lines.append(f"  saved case: {self.saved}")
        if o.traceback:
            lines.append("  " + o.traceback.strip().splitlines()[-1][:300])
        return "\n".join(lines)


@dataclass
class Report:
    fmt: str
    counts: Counter = field(default_factory=Counter)   # ok / error / fail
    failures: list = field(default_factory=list)
    classes: dict = field(default_factory=dict)        # failure_key -> [Failure]
    errors: Counter = field(default_factory=Counter)   # accepted error labels (for the summary)
    seconds: float = 0.0
    worker_starts: int = 0

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def add(self, case: Case, out: Outcome, saved: Optional[Path] = None) -> None:
        self.counts[out.kind] += 1
        if out.kind == "error":
            self.errors[out.label] += 1
        if out.kind == "fail":
            f = Failure(case, out, saved)
            self.failures.append(f)
            self.classes.setdefault(failure_key(case.fmt, out), []).append(f)

    def describe_failures(self, limit: int = 40) -> str:
        """One paragraph per failure class (its first case), most frequent first."""
        parts = [f"{self.fmt}: {len(self.failures)} failing cases of {self.cases} in {len(self.classes)} classes"]
        for key, fs in sorted(self.classes.items(), key=lambda kv: -len(kv[1]))[:limit]:
            parts.append(f"--- {len(fs)} x {key[1]} at {key[2] or '-'}\n{fs[0].describe()}")
        return "\n".join(parts)


def _save_failure(root: Path, case: Case, out: Outcome) -> Path:
    """Keep the failing case's files and a case.json describing it, under `root`."""
    folder = root / f"{case.fmt}-seed{case.seed}"
    write_case(folder / "files", case.files)
    (folder / "case.json").write_text(json.dumps({
        "format": case.fmt, "seed": case.seed, "base": case.base, "params": case.params, "mutations": case.notes,
        "outcome": out.label, "message": out.message, "where": out.where, "traceback": out.traceback}, indent=1))
    return folder


def run_campaign(fmt: str, seeds: Iterable[int], work: Path, jobs: int = 1, timeout: float = CASE_TIMEOUT,
                 mem_mb: int = MEM_MB, check_seeds: bool = True, progress: bool = False,
                 snapshot: Optional[Callable[[Report], None]] = None) -> Report:
    """Run the cases `seeds` of one format; failing cases are saved under work/failures.

    jobs > 1 runs that many workers side by side (case i goes to job i % jobs). With
    `progress`, every 500 cases print a line and call `snapshot(report)` (e.g. to write
    report.json, so a long campaign stopped early still leaves its counts)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    report, lock = Report(fmt), threading.Lock()
    t0 = time.monotonic()
    seeds_for(fmt)   # made once, before the threads want them

    def one_job(j: int) -> None:
        worker = Worker(fmt, work, mem_mb)
        folder = work / f"case{j}"
        checks = [seed_case(fmt, i) for i in range(len(seeds_for(fmt)))] if check_seeds and j == 0 else []
        cases = itertools.chain(checks, (build_case(fmt, s) for s in seeds[j::jobs]))   # built lazily
        try:
            for case in cases:
                write_case(folder, case.files)
                out = judge(worker.run(folder, case.params, timeout))
                if case.seed < 0 and out.kind != "ok":   # a valid seed must load cleanly
                    out = Outcome("fail", f"valid seed rejected ({out.label})", out.message, out.where, out.traceback)
                saved = None
                if out.kind == "fail":
                    with lock:   # keep a few cases per class: 2,000 copies of one bug fill a disk
                        keep = len(report.classes.get(failure_key(fmt, out), [])) < SAVED_PER_CLASS
                    saved = _save_failure(work / "failures", case, out) if keep else None
                if out.kind == "fail" and out.label != "Invalid":
                    # a fresh process for the next case: the failure may have left nt in a bad
                    # state. Not after Invalid: the loader returned normally and only our
                    # checks of its result failed (and a restart costs seconds of JIT warm-up)
                    worker.stop()
                with lock:
                    if case.seed >= 0 or out.kind == "fail":   # seed checks count only when they fail
                        report.add(case, out, saved)
                    if progress and report.cases % 500 == 0 and report.cases and case.seed >= 0:
                        print(f"  {fmt}: {report.cases} cases, {report.counts['fail']} failing", flush=True)
                        report.seconds = time.monotonic() - t0
                        if snapshot:
                            snapshot(report)
        finally:
            worker.stop()
            with lock:
                report.worker_starts += worker.starts

    problems = []   # a bug in the harness itself must not pass as a clean campaign

    def guarded(j: int) -> None:
        try:
            one_job(j)
        except BaseException as e:
            problems.append(e)

    threads = [threading.Thread(target=guarded, args=(j,)) for j in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if problems:
        raise problems[0]
    report.seconds = time.monotonic() - t0
    return report


def summary(reports: list) -> str:
    """Per format: cases run, accepted-ok, accepted-error, failures, failure classes."""
    return summary_of_json(report_json(reports))


def summary_of_json(entries: list) -> str:
    """The summary table of report_json entries (e.g. read back from report.json files)."""
    rows = [("format", "cases", "ok", "error", "fail", "classes", "seconds")]
    for e in entries:
        rows.append((e["format"], e["cases"], e["ok"], e["error"], e["fail"], len(e["classes"]), e.get("seconds", "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in rows)


def report_json(reports: list) -> list:
    """The reports as JSON-ready dicts: counts, accepted error types, one entry per failure class."""
    return [{"format": r.fmt, "cases": r.cases, "ok": r.counts["ok"], "error": r.counts["error"],
             "fail": r.counts["fail"], "seconds": round(r.seconds), "errors": dict(r.errors),
             "classes": [{"label": k[1], "where": k[2], "message": k[3], "count": len(v), "seed": v[0].case.seed,
                          "base": v[0].case.base, "mutations": v[0].case.notes, "full_message": v[0].outcome.message[:600]}
                         for k, v in sorted(r.classes.items(), key=lambda kv: -len(kv[1]))]} for r in reports]
