"""The last step of gpu_check.sh: every stage's status, JSON and log tail in one file, and a
short summary printed (the end of the output is what a remote run shows)."""
from __future__ import annotations

import argparse
import json
import os
import re
import time
import xml.etree.ElementTree as ET

LOG_TAIL = 4000   # characters of each stage's output kept in the JSON


def tests_summary(path: str) -> dict:
    """Counts and the failing tests (name and the start of the message) from pytest's junit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            bad = case.find(kind)
            if bad is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                               "message": (bad.get("message") or "")[:600]})
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def tests_from_log(path: str) -> dict:
    """The same counts from pytest -v's lines, for a run killed before it wrote its XML."""
    pattern = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
    outcomes = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = pattern.match(line)
            if m:
                outcomes[m.group(1)] = m.group(2)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"tests": len(outcomes), "passed": counts["PASSED"], "failures": counts["FAILED"], "errors": counts["ERROR"],
            "skipped": counts["SKIPPED"], "incomplete": True,
            "failed": [{"test": t, "kind": o.lower()} for t, o in outcomes.items() if o in ("FAILED", "ERROR")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--started", type=int, required=True)
    ap.add_argument("--simulate", type=int, default=0)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args()
    stages = {}
    with open(os.path.join(a.work, "stages.tsv")) as f:
        for line in f:
            name, rc, ms, status = line.rstrip("\n").split("\t")
            entry = {"status": status, "exit_code": int(rc), "seconds": int(ms) / 1000}
            log = os.path.join(a.work, f"{name}.log")
            if os.path.exists(log):
                with open(log, errors="replace") as g:
                    entry["log_tail"] = g.read()[-LOG_TAIL:]
            result = os.path.join(a.work, f"{name.split('_')[0]}.json")
            if os.path.exists(result) and name != "nvidia_smi":
                try:
                    with open(result) as g:
                        entry["result"] = json.load(g)
                except ValueError as e:
                    entry["result"] = {"error": f"unreadable JSON: {e}"}
            stages[name] = entry
    xml = os.path.join(a.work, "tests.xml")
    if "tests" in stages and os.path.exists(xml):
        stages["tests"]["result"] = tests_summary(xml)
    elif os.path.exists(os.path.join(a.work, "tests.log")):
        stages["tests"]["result"] = tests_from_log(os.path.join(a.work, "tests.log"))
    report = {"tool": "benchmarks/gpu_check.sh", "commit": a.commit, "simulated": bool(a.simulate),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.started)),
              "total_seconds": round(time.time() - a.started, 1), "work_dir": a.work, "stages": stages}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\n{'stage':20s} {'status':32s} {'seconds':>8s}")
    for name, e in stages.items():
        print(f"{name:20s} {e['status'][:32]:32s} {e['seconds']:8.1f}")
    t = stages.get("tests", {}).get("result", {})
    if "tests" in t:
        print(f"tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
    print(f"total {report['total_seconds']} s -> {a.out}")


if __name__ == "__main__":
    main()
