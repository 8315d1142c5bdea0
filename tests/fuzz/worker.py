"""The worker: a long-lived process that loads fuzz cases of one format and reports.

Started by harness.Worker as `python -m <package>.worker FORMAT MEM_MB`. It caps its own
address space (RLIMIT_AS) before importing nt, so a loader that trusts a size field gets a
MemoryError here instead of taking the machine down, then answers requests:

    stdin:  {"folder": "/tmp/.../case", "params": {...}}          one JSON line per case
    stdout: {"status": "ok"} or {"status": "raised", ...}         one JSON line per case

A segfault or abort simply ends the process; the parent sees the pipe close, records the
case and starts a new worker. The protocol uses a private copy of the original stdout:
file descriptor 1 is pointed at stderr, so a stray print in nt cannot corrupt it.
"""
from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

# every frame of the package under test lives under one of these
NT_DIRS = (f"{os.sep}src{os.sep}nt{os.sep}", f"{os.sep}kernels{os.sep}", f"{os.sep}site-packages{os.sep}nt{os.sep}")


def innermost_nt_frame(tb) -> str:
    """'nt/io/gguf.py:123 in _check_tensor' for the deepest frame inside nt, else ''."""
    where = ""
    for frame in traceback.extract_tb(tb):
        if any(d in frame.filename for d in NT_DIRS):
            short = frame.filename.split(f"{os.sep}src{os.sep}")[-1]
            where = f"{short}:{frame.lineno} in {frame.name}"
    return where


def describe(exc: BaseException, invalid_type) -> dict:
    """The reply for a case that raised: type, message, category, where, traceback."""
    from nt.io import FormatError
    if isinstance(exc, FormatError):
        category = "format_error"
    elif type(exc) is ValueError:   # subclasses (UnicodeDecodeError, JSONDecodeError) are not accepted
        category = "value_error"
    elif isinstance(exc, invalid_type):
        category = "invalid"
    else:
        category = "other"
    return {"status": "raised", "category": category, "type": type(exc).__name__,
            "message": str(exc)[:4000], "where": innermost_nt_frame(exc.__traceback__),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]}


def probe(request: dict) -> None:
    """Misbehave on purpose, so tests can check the harness catches each kind of failure:
    an allocation past the cap (must be a MemoryError), a segfault, a hang."""
    kind = request["probe"]
    if kind == "alloc":
        import numpy as np
        np.ones(request["mb"] << 20, dtype=np.uint8)
    elif kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "hang":
        time.sleep(3600)


def main() -> None:
    fmt, mem_mb = sys.argv[1], int(sys.argv[2])
    limit = mem_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    faulthandler.enable()            # a segfault leaves a Python stack in the worker's log
    warnings.simplefilter("ignore")  # overflow warnings from huge weights are not failures
    sys.setrecursionlimit(3000)

    from .formats import FORMATS, Invalid
    exercise = FORMATS[fmt].exercise
    proto.write(json.dumps({"status": "ready", "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "probe" in request:
                probe(request)
            else:
                exercise(Path(request["folder"]), request.get("params", {}))
            reply = {"status": "ok"}
        except Exception as exc:   # MemoryError and RecursionError included: both are Exceptions
            reply = describe(exc, Invalid)
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
