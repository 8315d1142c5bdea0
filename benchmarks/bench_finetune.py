"""LoRA against full fine-tuning: step time and peak memory on SmolLM2-135M's shape.

    python benchmarks/bench_finetune.py                   # B=4 T=256 fp32 2 threads, r=16 on every projection
    python benchmarks/bench_finetune.py --steps 3 --json  # one JSON object
    python benchmarks/bench_finetune.py --preset llama-mini --steps 5   # a quick look

Each mode runs in its own spawned worker process, so the peak RSS each reports is its own
(a process cannot measure two peaks). Both build the same random model (seed 0); the LoRA
worker attaches rank-16 adapters to q, k, v, o, gate, up, down (the base frozen), the full
worker trains every parameter. A step is what nt.train_utils.train does: zero grads,
forward + backward (accumulate_grads), the clipping factor (clip_factor) and AdamW's
step(grad_scale=). After one warm-up step each (compilation, arenas), timed steps
alternate LoRA, full, LoRA, full, ... so drift in the machine's speed hits both alike;
the median of each is reported. Targets (issue 12): LoRA step <= 0.6x, peak RSS <= 0.5x.
The peak covers the worker's whole life, building the model and attaching the adapters
included; `*_rss_steps_mib` is the resident memory after the timed steps.

The JSON also gives the floor: multiply-adds per token of each step (multiply_adds) and
their ratio, 0.714 here, below which LoRA cannot go at equal gemm speed. Measurements and
what changed: docs/finetune.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

import numpy as np

LR, RANK, ALPHA = 1e-4, 16, 32
TARGETS = {"step": 0.6, "rss": 0.5}


def current_rss_mib() -> float:
    """The process's resident memory now (Linux /proc; 0 where it is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker(conn, mode: str, preset: str, B: int, T: int, threads: int) -> None:
    """Build the model for `mode` ("lora" or "full") and serve: "step" -> ms, "rss" -> MiB, "stop"."""
    import numba
    numba.set_num_threads(threads)
    from nt.lora import LoRA, all_targets
    from nt.models import Llama, LlamaConfig
    from nt.optim import AdamW, clip_factor
    from nt.train_utils import accumulate_grads

    cfg = LlamaConfig.preset(preset, block_size=T)
    model = Llama(cfg, dtype=np.float32, seed=0)
    if mode == "lora":
        LoRA(model, RANK, ALPHA, all_targets(model))
    params = model.trainable_params
    opt = AdamW(params, lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    batch = (x, np.roll(x, -1, axis=1))
    conn.send({"trainable": int(params.size), "total": int(model.num_params)})
    while True:
        command = conn.recv()
        if command == "step":
            t0 = time.perf_counter()
            loss = accumulate_grads(model, lambda: batch)
            _, clip = clip_factor(params, 1.0)
            opt.step(lr=LR, grad_scale=clip, loss=loss)
            conn.send((time.perf_counter() - t0) * 1e3)
        elif command == "rss":   # (peak over the process's life, now: after the steps), MiB
            conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, current_rss_mib()))
        else:
            return


def multiply_adds(cfg, T: int, rank: int) -> tuple[float, float]:
    """Multiply-adds per token of a full and of a LoRA (every projection) training step: the
    gemms (forward linears and classifier; every input gradient; full: every weight
    gradient; LoRA: the adapters' 2 forward and 4 backward gemms, 3 r (C_in + C_out) per
    adapted linear) and causal attention (QK^T and PV over (T+1)/2 keys on average, the
    backward counted as 2.5 forwards). Elementwise work and AdamW are left out."""
    C, H, hs, L = cfg.dim, cfg.ffn_hidden, cfg.hs, cfg.n_layers
    q, kv = cfg.n_heads * hs, cfg.n_kv_heads * hs
    linears = [(C, q), (C, kv), (C, kv), (q, C), (C, H), (C, H), (H, C)]   # (in, out): q k v o gate up down
    forward = L * sum(i * o for i, o in linears) + C * cfg.padded_vocab_size
    attention = L * cfg.n_heads * hs * (T + 1) / 2 * 2 * 3.5
    adapters = L * sum(3 * rank * (i + o) for i, o in linears)
    return 3 * forward + attention, 2 * forward + adapters + attention


def run(preset: str, B: int, T: int, steps: int, threads: int) -> dict:
    """Warm up both workers, time `steps` interleaved steps each, read their peak RSS."""
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    ctx = mp.get_context("spawn")
    workers = {}
    for mode in ("lora", "full"):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(there, mode, preset, B, T, threads))
        proc.start()
        workers[mode] = (here, proc, here.recv())
    times = {mode: [] for mode in workers}
    for i in range(steps + 1):
        for mode, (conn, _, _) in workers.items():
            conn.send("step")
            ms = conn.recv()
            if i > 0:   # the first step compiles and sizes the arenas
                times[mode].append(ms)
        print(f"step {i}: " + "  ".join(f"{m} {t[-1]:.0f} ms" for m, t in times.items() if t), file=sys.stderr)
    rss = {}
    for mode, (conn, proc, _) in workers.items():
        conn.send("rss")
        rss[mode] = conn.recv()
        conn.send("stop")
        proc.join()
    lora_ms, full_ms = statistics.median(times["lora"]), statistics.median(times["full"])
    from nt.models import LlamaConfig
    full_madds, lora_madds = multiply_adds(LlamaConfig.preset(preset, block_size=T), T, RANK)
    return {"config": {"preset": preset, "B": B, "T": T, "dtype": "float32", "threads": threads, "rank": RANK,
                       "alpha": ALPHA, "targets": "q,k,v,o,gate,up,down", "optimizer": "AdamW",
                       "timed_steps": steps, "lora_trainable": workers["lora"][2]["trainable"],
                       "full_trainable": workers["full"][2]["trainable"]},
            "lora_ms": round(lora_ms, 1), "full_ms": round(full_ms, 1),
            "lora_rss_mib": round(rss["lora"][0], 1), "full_rss_mib": round(rss["full"][0], 1),
            "step_ratio": round(lora_ms / full_ms, 3), "rss_ratio": round(rss["lora"][0] / rss["full"][0], 3),
            "lora_rss_steps_mib": round(rss["lora"][1], 1), "full_rss_steps_mib": round(rss["full"][1], 1),
            "step_floor": round(lora_madds / full_madds, 3),
            "madds_per_token_m": {"full": round(full_madds / 1e6, 1), "lora": round(lora_madds / 1e6, 1)}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", help="Llama preset whose shape to use (random weights)")
    p.add_argument("-B", type=int, default=4, help="batch size (default 4)")
    p.add_argument("-T", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each mode after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=2, help="Numba and BLAS threads per worker (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    r = run(args.preset, args.B, args.T, args.steps, args.threads)
    if args.json:
        print(json.dumps(r))
        return
    c = r["config"]
    print(f"{c['preset']} B={c['B']} T={c['T']} fp32 {c['threads']} threads, LoRA r={RANK} on {c['targets']} "
          f"({c['lora_trainable']:,} trainable) vs full ({c['full_trainable']:,}), AdamW, median of {c['timed_steps']}")
    print(f"{'':6} {'ms/step':>10} {'peak RSS MiB':>14} {'after steps':>12}")
    for mode in ("lora", "full"):
        print(f"{'LoRA' if mode == 'lora' else 'full':6} {r[mode + '_ms']:>10.1f} {r[mode + '_rss_mib']:>14.1f} "
              f"{r[mode + '_rss_steps_mib']:>12.1f}")
    for what, key in (("step", "step_ratio"), ("rss", "rss_ratio")):
        verdict = "met" if r[key] <= TARGETS[what] else "missed"
        print(f"{what} ratio LoRA/full: {r[key]:.3f} (target <= {TARGETS[what]}: {verdict})")
    m = r["madds_per_token_m"]
    print(f"floor: LoRA {m['lora']}M vs full {m['full']}M multiply-adds per token = {r['step_floor']:.3f}x "
          "(gemms and attention at equal speed; see multiply_adds)")


if __name__ == "__main__":
    main()
