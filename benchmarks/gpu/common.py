"""Shared by the stages of benchmarks/gpu_check.sh: arguments, the simulator switch, JSON output.

Every stage is `python benchmarks/gpu/<stage>.py --out FILE [--simulate]`; it writes one JSON
object to FILE, adding to it as it goes, so a stage killed by its time box still leaves what
it measured. --simulate runs the stage under numba-cuda's simulator at tiny sizes: it
checks the script, not the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def parse(description: str, **extra) -> argparse.Namespace:
    """--out and --simulate, plus `extra` {name: default} options; sets the simulator switch
    before anything imports numba.cuda."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, help="JSON file this stage writes")
    ap.add_argument("--simulate", action="store_true", help="numba-cuda's simulator, tiny sizes")
    for name, default in extra.items():
        ap.add_argument(f"--{name}", type=type(default), default=default)
    args = ap.parse_args()
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if args.simulate else "0"
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    return args


class Report:
    """A JSON object on disk, rewritten after every `set` (atomically: temp file + rename)."""

    def __init__(self, path: str):
        self.path = path
        self.data: dict = {}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def attempt(self, key: str, fn, *args, **kwargs):
        """report[key] = fn(...), or {"error": ...} with the traceback's tail if it raises."""
        t0 = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except Exception as e:  # a failed probe is a result; the stage goes on
            value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if isinstance(value, dict):
            value.setdefault("seconds", round(time.perf_counter() - t0, 3))
        self.set(key, value)
        return value
