"""Where a training run's memory goes: resident memory by stage, and the arenas' share of it.

    python benchmarks/bench_memory.py                    # the default run, GPT-2 d12 and d6
    python benchmarks/bench_memory.py --config d12 --json
    python benchmarks/bench_memory.py --script           # also the default command itself, end to end

Each config runs in its own spawned process (a peak belongs to one process), on random
tokens, fp32, 2 threads, llm.c's AdamW with clipping, as train_gpt2.py steps:
- `default`: the README's first command's model and batch (GPT-2 `mini`, V=4096, T=64, 16
  sequences a step as 8 micro-batches of 2; issue 18's target: a peak under 250 MB = 238.4 MiB)
- `d12`: GPT-2 124M, B=4, T=64 (llm.c's CPU reference: 2461 MiB peak)
- `d6`: 6 layers x 384, B=8, T=256 (torch.compile: 1638 MiB peak)
Stages (RSS, MiB): Python + NumPy, + Numba, + `import nt`, + the first kernel call (Numba's
CPU target and LLVM's JIT start then, even for a kernel loaded from the cache), the model and
optimizer built, the first step, and the peak (VmHWM) over all steps. After the last step the
resident memory is split into anonymous memory (what the process allocated: arenas, Python
objects, Numba's and LLVM's data) and file-backed pages (the shared libraries' code and data
that ran, 69 MiB of it LLVM's). Then what the arenas hold (parameters + grads, AdamW's m
and v, activations, their planned grads, saved statistics and the classifier's logits,
scratch) and the rest: the runtime (interpreter, NumPy, SciPy's BLAS, Numba's compiler and
the loaded kernels). `--script` also runs `train/train_gpt2.py
--steps 3` (tokenizer, built-in corpus, evaluation) and reports its peak.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # the README's default command: 16 sequences a step as 8 micro-batches of 2 (train_gpt2.py)
    "default": dict(preset="mini", vocab_size=4096, B=2, T=64, grad_accum=8),
    "d12": dict(preset="d12", vocab_size=50257, B=4, T=64),
    "d6": dict(preset="d6", vocab_size=50257, B=8, T=256),
}
# peak RSS references in MiB; issue 18's target for the default run is 250 MB = 238.4 MiB
REFERENCES = {"d12": ("llm.c", 2461), "d6": ("torch.compile", 1638), "default": ("target 250 MB", 250e6 / 2 ** 20)}
MIB = 2 ** 20


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux /proc; elsewhere the peak twice)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def rss_split_mib() -> dict:
    """Current resident memory split into anonymous and file-backed pages, MiB (Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {"anonymous": int(fields["RssAnon"].split()[0]) / 1024, "file": int(fields["RssFile"].split()[0]) / 1024}
    except (OSError, KeyError):
        return {}


def worker(conn, name: str, steps: int, threads: int) -> None:
    """Measure one config and send back its stages and arena sizes."""
    stages = {"python": rss_mib()[0]}
    import numpy as np
    stages["numpy"] = rss_mib()[0]
    import numba
    numba.set_num_threads(threads)
    stages["numba"] = rss_mib()[0]
    import nt
    from nt.models import GPT2, GPT2Config
    from nt.optim import AdamW, clip_factor
    stages["import nt"] = rss_mib()[0]
    nt.backend("cpu").fill_(np.zeros(16, np.float32), 0.0)
    stages["first kernel"] = rss_mib()[0]
    c = CONFIGS[name]
    model = GPT2(GPT2Config.preset(c["preset"], vocab_size=c["vocab_size"], block_size=max(c["T"], 64)), seed=0)
    opt = AdamW(model.params, lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, c["vocab_size"], (c["B"], c["T"])).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    accum = c.get("grad_accum", 1)
    stages["built"] = rss_mib()[0]
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        model.zero_grad()
        for _ in range(accum):   # micro-batches: grads accumulate, the update sees their mean
            model.forward(x, y)
            model.backward()
        _, clip = clip_factor(model.params, accum * 1.0)
        opt.step(grad_scale=clip / accum)
        times.append(time.perf_counter() - t0)
        if i == 0:
            stages["first step"] = rss_mib()[0]
    stages["peak"] = rss_mib()[1]
    t = model.tape
    arenas = {"params + grads": model.params.arena.nbytes, "AdamW m, v": opt.m.nbytes + opt.v.nbytes,
              "activations": t.acts.nbytes - t.acts.gbuf.nbytes, "activation grads": t.acts.gbuf.nbytes,
              "saved + logits": t.saved.nbytes, "scratch": t._work.nbytes + t.ints.nbytes}
    conn.send({"config": {**c, "params": model.num_params, "steps": steps, "threads": threads},
               "stages_mib": {k: round(v, 1) for k, v in stages.items()},
               "arenas_mib": {k: round(v / MIB, 1) for k, v in arenas.items()},
               "end_split_mib": {k: round(v, 1) for k, v in rss_split_mib().items()},
               "step_ms": round(1e3 * min(times[1:] or times), 1)})


def run_config(name: str, steps: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(there, name, steps, threads))
    proc.start()
    there.close()   # so recv() sees the end of the pipe if the worker dies
    try:
        result = here.recv()
    except EOFError:
        proc.join()
        raise SystemExit(f"{name}: the worker died (exit code {proc.exitcode}); its error is above") from None
    proc.join()
    arenas = sum(result["arenas_mib"].values())
    result["runtime_mib"] = round(result["stages_mib"]["peak"] - arenas, 1)
    result["peak_rss_mib"] = result["stages_mib"]["peak"]
    return result


def run_script(threads: int) -> float:
    """Peak RSS (MiB) of the default training command run for 3 steps in a child process."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(root / "train" / "train_gpt2.py"), "--steps", "3", "--out-dir", out]
        subprocess.run(cmd, check=True, capture_output=True, cwd=out)
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="config(s) to run (default: all)")
    p.add_argument("--steps", type=int, default=3, help="training steps per config (default 3)")
    p.add_argument("--threads", type=int, default=2, help="Numba and BLAS threads (default 2)")
    p.add_argument("--script", action="store_true", help="also run train/train_gpt2.py --steps 3 and report its peak")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    results = {}
    if args.script:   # first: the children's peak is the largest of every child so far
        results["default script"] = {"peak_rss_mib": run_script(args.threads)}
    results.update({name: run_config(name, args.steps, args.threads) for name in (args.config or CONFIGS)})
    if args.json:
        print(json.dumps(results))
        return
    for name, r in results.items():
        ref = REFERENCES.get(name.split()[0])
        versus = f" ({ref[0]}: {ref[1]:.1f} MiB)" if ref else ""
        peak = f"peak RSS {r['peak_rss_mib']:.1f} MiB = {r['peak_rss_mib'] * MIB / 1e6:.1f} MB{versus}"
        if "stages_mib" not in r:
            print(f"{name}: {peak}\n")
            continue
        c = r["config"]
        batch = f"B={c['B']}" + (f" x {c['grad_accum']} micro-batches" if c.get("grad_accum", 1) > 1 else "")
        print(f"{name}: GPT-2 {c['preset']} V={c['vocab_size']} {batch} T={c['T']}, {c['params']:,} parameters, "
              f"{r['step_ms']:.0f} ms/step: {peak}")
        print("  RSS by stage  " + "  ".join(f"{k} {v:.0f}" for k, v in r["stages_mib"].items()))
        print("  arenas        " + "  ".join(f"{k} {v:.0f}" for k, v in r["arenas_mib"].items()))
        print(f"  runtime       {r['runtime_mib']:.0f} MiB (peak minus arenas)")
        print("  at the end    " + "  ".join(f"{k} {v:.0f}" for k, v in r["end_split_mib"].items()) + "\n")


if __name__ == "__main__":
    main()
