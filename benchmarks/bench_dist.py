"""Data-parallel training cost on this machine: where a step's time goes, what it sends,
what optimizer state each rank keeps, and 2 ranks x 1 thread against 1 rank x 2 threads.

    flock /tmp/nt-bench.lock python benchmarks/bench_dist.py            # GPT-2 d6, global B=8, T=128
    flock /tmp/nt-bench.lock python benchmarks/bench_dist.py --json --preset mini --batch 16 --steps 4

Three set-ups train the same model on the same global batch (--batch sequences of -T
tokens per step), each in its own process(es): 1 rank x 2 threads, 2 ranks x 1 thread
(`mpiexec -n 2`, the grads all-reduced), and 2 ranks x 1 thread with ZeRO-1. They take
turns for --rounds rounds so the machine's drift hits all alike; the first two steps of
each turn are not timed. A step is split into compute (forward + backward), sync (the
grads' all-reduce or reduce-scatter, including waiting for the slower rank), clip (the
global norm; a scalar all-reduce under ZeRO) and update (AdamW; + the parameters'
all-gather under ZeRO). The 2-rank runs also time the grad all-reduce alone: one call on
the whole buffer against buckets, and ZeRO's reduce-scatter + all-gather.

Bytes per step are what each rank sends in a ring implementation, 2 (N-1)/N x the grad
buffer (the same for all-reduce and for reduce-scatter + all-gather); --bandwidth GB/s
and --latency us project a step on 8 and 64 ranks from them (weak scaling: the per-rank
batch and compute stay as measured on one core; no overlap of communication with compute).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def worker(args) -> None:
    """One set-up's timed steps (run as 1 process or under mpiexec); rank 0 prints JSON."""
    from nt import dist
    from nt.models import GPT2, GPT2Config
    from nt.optim import AdamW
    from nt.train_utils import accumulate_grads, lm_loss

    world = dist.world()
    N = world.size
    B = args.batch // N
    cfg = GPT2Config.preset(args.preset, vocab_size=args.vocab, block_size=max(args.seq_len, 64))
    model = GPT2(cfg, seed=0)
    params = model.params
    dp = dist.DataParallel(params, lambda p: AdamW(p, lr=1e-4, weight_decay=0.1), zero=args.zero, w=world)
    rng = np.random.default_rng(world.rank)
    x = rng.integers(0, args.vocab, size=(B, args.seq_len), dtype=np.int32)
    y = rng.integers(0, args.vocab, size=(B, args.seq_len), dtype=np.int32)
    phases = {"compute": [], "sync": [], "clip": [], "update": [], "step": []}
    for step in range(args.steps + 2):
        world.barrier()
        t0 = time.perf_counter()
        loss = accumulate_grads(model, lambda: (x, y), 1, None, lm_loss)
        t1 = time.perf_counter()
        dp.sync_grads()
        t2 = time.perf_counter()
        _, clip = dp.clip_factor(1.0)
        world.mean(loss)
        t3 = time.perf_counter()
        dp.step(grad_scale=clip)
        t4 = time.perf_counter()
        if step >= 2:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[name].append(dt)
    result = {"ranks": N, "threads": int(os.environ.get("NUMBA_NUM_THREADS", "0")), "zero": args.zero,
              "params": int(params.size), "grad_bytes": int(params.grad.nbytes),
              "bytes_per_step": dp.bytes_per_step(), "optimizer_state_bytes_per_rank": dp.state_bytes(),
              "ms": {name: statistics.median(v) * 1e3 for name, v in phases.items()}}
    result["tokens_per_s"] = args.batch * args.seq_len / (result["ms"]["step"] / 1e3)
    if N > 1 and not args.zero:
        result["collectives_ms"] = collectives(world, params, dp)
    if world.is_main:
        print("RESULT " + json.dumps(result), flush=True)


def collectives(world, params, dp, reps: int = 5) -> dict:
    """Median ms of the grad buffer's all-reduce, whole and in buckets, and of ZeRO's
    reduce-scatter + all-gather, taking turns."""
    from nt import dist
    comm, grad, n = world.comm, params.grad, params.size
    shard = np.empty(int(np.diff(dp.offsets)[world.rank]), dtype=grad.dtype)
    variants = {"allreduce_one_call": lambda: comm.allreduce_(grad, n),
                f"allreduce_buckets_{dist.DEFAULT_BUCKET >> 20}M (default)": lambda: comm.allreduce_(grad),
                "allreduce_buckets_1M": lambda: comm.allreduce_(grad, 1 << 20),
                "reduce_scatter_allgather": lambda: (comm.reduce_scatter(grad, shard, dp.offsets),
                                                     comm.allgather_(params.flat, dp.offsets))}
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            world.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def run_setup(args, ranks: int, threads: int, zero: int) -> dict:
    flags = ["--worker", "--preset", args.preset, "--vocab", str(args.vocab), "--batch", str(args.batch),
             "-T", str(args.seq_len), "--steps", str(args.steps), "--zero", str(zero)]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(HERE), *flags]
    if ranks > 1:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def projection(result: dict, bandwidth_gbs: float, latency_us: float) -> dict:
    """Step time on 8 and 64 ranks: the measured compute of one rank + the ring all-reduce
    of the grad buffer at `bandwidth_gbs` GB/s per link and `latency_us` per message."""
    compute = (result["ms"]["compute"] + result["ms"]["update"]) / 1e3
    out = {}
    for N in (2, 8, 64):
        comm = 2 * (N - 1) / N * result["grad_bytes"] / (bandwidth_gbs * 1e9) + 2 * (N - 1) * latency_us * 1e-6
        out[N] = {"comm_ms": comm * 1e3, "step_ms": (compute + comm) * 1e3, "efficiency": compute / (compute + comm)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="d6", help="GPT-2 preset (default d6)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences (default 8)")
    p.add_argument("-T", "--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per turn (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="turns of each set-up (default 2)")
    p.add_argument("--bandwidth", type=float, default=12.5, help="GB/s per link for the projection "
                                                                  "(default 12.5: 100 Gb/s InfiniBand)")
    p.add_argument("--latency", type=float, default=5.0, help="microseconds per message for the projection")
    p.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not MPIEXEC.exists():
        sys.exit(f"no mpiexec beside {sys.executable}: pip install 'nt[mpi]'")
    setups = {"1 rank x 2 threads": (1, 2, 0), "2 ranks x 1 thread": (2, 1, 0),
              "2 ranks x 1 thread, ZeRO-1": (2, 1, 1)}
    turns = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            turns[name].append(run_setup(args, *setup))
    best = {name: max(runs, key=lambda r: r["tokens_per_s"]) for name, runs in turns.items()}
    report = {"config": {k: getattr(args, k) for k in ("preset", "vocab", "batch", "seq_len", "steps", "rounds")},
              "setups": best,
              "tokens_per_s_2x1_over_1x2": best["2 ranks x 1 thread"]["tokens_per_s"]
              / best["1 rank x 2 threads"]["tokens_per_s"],
              "projection": {"bandwidth_GBs": args.bandwidth, "latency_us": args.latency,
                             "steps": projection(best["2 ranks x 1 thread"], args.bandwidth, args.latency)}}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    r0 = best["1 rank x 2 threads"]
    print(f"GPT-2 {args.preset} V={args.vocab}: {r0['params']:,} parameters, grads {r0['grad_bytes'] / 2**20:.1f} MiB; "
          f"global batch {args.batch} x {args.seq_len} tokens (best of {args.rounds} turns)")
    print(f"{'set-up':28s} {'tok/s':>8s} {'step':>8s} {'compute':>8s} {'sync':>8s} {'clip':>6s} {'update':>7s} "
          f"{'sent/step':>10s} {'opt state/rank':>15s}")
    for name, r in best.items():
        ms = r["ms"]
        print(f"{name:28s} {r['tokens_per_s']:8,.0f} {ms['step']:7.1f}ms {ms['compute']:7.1f}ms {ms['sync']:7.1f}ms "
              f"{ms['clip']:5.1f}ms {ms['update']:6.1f}ms {r['bytes_per_step'] / 2**20:8.1f}MiB "
              f"{r['optimizer_state_bytes_per_rank'] / 2**20:13.1f}MiB")
    print(f"2 ranks x 1 thread / 1 rank x 2 threads tokens/s: {report['tokens_per_s_2x1_over_1x2']:.2f}")
    print("grad all-reduce alone (2 ranks): " + ", ".join(
        f"{k} {v:.1f} ms" for k, v in best["2 ranks x 1 thread"]["collectives_ms"].items()))
    print(f"projection at {args.bandwidth} GB/s, {args.latency} us per message (compute as on one core, no overlap):")
    for N, v in report["projection"]["steps"].items():
        print(f"  {N:3d} ranks: comm {v['comm_ms']:7.1f} ms, step {v['step_ms']:7.1f} ms, efficiency {v['efficiency']:.0%}")


if __name__ == "__main__":
    main()
