"""Command line for the fuzz harness: reproduce one case, or run a campaign.

    python -m tests.fuzz.run --format gguf --seed 123              # one case, in this process: full traceback
    python -m tests.fuzz.run --format gguf --seed 123 --worker     # the same in a capped worker (survives segfaults)
    python -m tests.fuzz.run --format gguf --seed 123 --save DIR   # also write the case's files to DIR
    python -m tests.fuzz.run --format all --cases 10000 --start 1000000 --jobs 2 --out /tmp/fuzz
                                                                   # campaign: summary + one paragraph per failure class
    python -m tests.fuzz.run --summarize /tmp/fuzz/*/report.json   # the summary table of finished campaigns

Run from the repository root. Case seeds are stable: seed N of a format is the same file
on every run, so a seed from a report is all it takes to get the bytes back.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import tempfile
import traceback
from pathlib import Path

from .formats import FORMATS
from .harness import (CASE_TIMEOUT, MEM_MB, Worker, build_case, judge, report_json, run_campaign, seed_case,
                      summary, summary_of_json, write_case)


def reproduce(fmt: str, seed: int, save: str | None, in_worker: bool) -> int:
    """Build case `seed` of `fmt`, print what it is, run it and print the outcome."""
    case = build_case(fmt, seed) if seed >= 0 else seed_case(fmt, -1 - seed)
    print(f"[{fmt}] case seed {seed} from seed file {case.base!r}")
    for note in case.notes:
        print(f"  mutation: {note}")
    folder = Path(save) if save else Path(tempfile.mkdtemp(prefix=f"nt-fuzz-{fmt}-"))
    write_case(folder, case.files)
    print(f"  files in {folder}")
    if in_worker:
        worker = Worker(fmt, folder.parent)
        try:
            out = judge(worker.run(folder, case.params))
        finally:
            worker.stop()
        print(f"outcome: {out.kind} {out.label}: {out.message[:1000]}\n  where: {out.where}")
        if out.traceback:
            print(out.traceback)
        return 1 if out.kind == "fail" else 0
    faulthandler.enable()
    from nt.io import FormatError
    try:
        FORMATS[fmt].exercise(folder, case.params)
    except (FormatError, ValueError) as e:
        accepted = isinstance(e, FormatError) or type(e) is ValueError
        print(f"outcome: {'error (accepted)' if accepted and str(e) else 'FAIL'} {type(e).__name__}: {e}")
        if not accepted:
            traceback.print_exc()
        return 0 if accepted and str(e) else 1
    except Exception as e:   # Invalid (a failed check) included
        traceback.print_exc()
        print(f"outcome: FAIL {type(e).__name__}: {e}")
        return 1
    print("outcome: ok (loaded and validated)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=[*FORMATS, "all"])
    p.add_argument("--summarize", nargs="+", metavar="REPORT_JSON", help="print the summary of report.json files")
    p.add_argument("--seed", type=int, help="reproduce this one case (negative: the unmutated seed file -1-N)")
    p.add_argument("--worker", action="store_true", help="run the reproduced case in a capped worker process")
    p.add_argument("--save", help="folder to write the reproduced case's files to")
    p.add_argument("--cases", type=int, default=100, help="campaign: number of cases per format")
    p.add_argument("--start", type=int, default=0, help="campaign: first case seed")
    p.add_argument("--jobs", type=int, default=1, help="campaign: worker processes per format")
    p.add_argument("--timeout", type=float, default=CASE_TIMEOUT, help="seconds per case")
    p.add_argument("--mem-mb", type=int, default=MEM_MB, help="address-space cap of a worker")
    p.add_argument("--out", help="campaign: folder for logs, failing cases and report.json")
    args = p.parse_args(argv)
    if args.summarize:
        entries = [e for path in args.summarize for e in json.loads(Path(path).read_text())]
        print(summary_of_json(entries))
        return 0
    if args.format is None:
        p.error("--format is required (or --summarize)")

    if args.seed is not None:
        if args.format == "all":
            p.error("--seed needs one --format")
        return reproduce(args.format, args.seed, args.save, args.worker)

    out = Path(args.out or tempfile.mkdtemp(prefix="nt-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    reports = []

    def write_report(current=None) -> None:
        done = reports + ([current] if current is not None and current not in reports else [])
        (out / "report.json").write_text(json.dumps(report_json(done), indent=1))

    for fmt in (FORMATS if args.format == "all" else [args.format]):
        r = run_campaign(fmt, range(args.start, args.start + args.cases), out / fmt, jobs=args.jobs,
                         timeout=args.timeout, mem_mb=args.mem_mb, progress=True, snapshot=write_report)
        reports.append(r)
        write_report()
        print(f"{fmt}: {r.cases} cases in {r.seconds:.0f} s, {r.counts['fail']} failing, {r.worker_starts} worker starts",
              flush=True)
        if r.failures:
            print(r.describe_failures(), flush=True)
    print(summary(reports))
    print(f"report: {out / 'report.json'}")
    return 1 if any(r.failures for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
