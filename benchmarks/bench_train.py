"""Training-step speed of nt against PyTorch on the same GPT-2, side by side in one run.

    python benchmarks/bench_train.py                      # d12 B=4 T=64 and d6 B=8 T=256
    python benchmarks/bench_train.py --configs mini:16:128 --steps 5 --json
    python benchmarks/bench_train.py --compile            # also torch.compile

Each framework runs in its own spawned worker process (so peak RSS is its own) on the same
weights and the same batch; the losses must agree before anything is timed. Timed steps
alternate nt, torch, nt, torch, ... so drift in the machine's speed hits both alike. A step
is forward + backward + grad clipping + AdamW. FLOPs follow nanoGPT's estimate
(6 N + 12 L C T per token, N without position embeddings); MFU is against the sgemm rate
measured at the start of the run with nt's own BLAS call.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.1, 1.0


def parse_config(spec: str):
    """'d12:4:64' -> (preset, B, T)."""
    preset, B, T = spec.split(":")
    return preset, int(B), int(T)


def make_config(preset: str, T: int):
    from nt.models import GPT2Config
    return GPT2Config.preset(preset, vocab_size=50257, block_size=max(T, 64))


def batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)


def flops_per_step(cfg, B, T) -> float:
    C, L = cfg.n_embd, cfg.n_layer
    n = cfg.vocab_size * C + L * (12 * C * C + 13 * C) + 2 * C  # params without wpe, real V
    return (6 * n + 12 * L * C * T) * B * T


# ---------------------------------------------------------------------------- workers

def worker(conn, framework: str, preset: str, B: int, T: int, weights: str, compile_: bool):
    """Build one framework's model from `weights` and serve commands: loss, step, stats."""
    cfg = make_config(preset, T)
    x, y = batch(cfg, B, T)
    flat = np.fromfile(weights, dtype=np.float32)
    if framework == "nt":
        from nt.models import GPT2
        from nt.optim import AdamW, clip_factor
        model = GPT2(cfg, seed=None)
        model.load_flat(flat)
        opt = AdamW(model.params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)

        def loss():
            return model(x, y)[1]

        def step():
            model.forward(x, y)
            model.zero_grad()
            model.backward()
            _, clip = clip_factor(model.params, CLIP)  # applied inside the AdamW kernel, as llm.c does
            opt.step(grad_scale=clip)
    else:
        import torch
        from torch_gpt2 import TorchGPT2
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
        torch.manual_seed(0)
        model = TorchGPT2(cfg)
        model.load_nt_flat(flat)
        opt = model.adamw(LR, WEIGHT_DECAY)
        run = torch.compile(model) if compile_ else model
        tx, ty = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

        def loss():
            with torch.no_grad():
                return float(run(tx, ty))

        def step():
            l = run(tx, ty)
            l.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    del flat  # the weight file's copy is not part of the model's footprint
    reset_peak_rss()
    conn.send(("ready", None))
    while True:
        cmd = conn.recv()
        if cmd == "loss":
            conn.send(("loss", loss()))
        elif cmd == "step":
            t0 = time.perf_counter()
            step()
            conn.send(("step", time.perf_counter() - t0))
        elif cmd == "stats":
            conn.send(("stats", peak_rss()))
            return


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS mark (Linux), so the peak covers the training steps
    and not the loading before them."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident memory in bytes since reset_peak_rss (Linux), else since start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    def __init__(self, ctx, *args):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, *args), daemon=True)
        self.proc.start()
        self.expect("ready")

    def ask(self, cmd):
        self.conn.send(cmd)
        return self.expect(cmd)

    def expect(self, what):
        if not self.conn.poll(1800):
            raise RuntimeError(f"worker gave no {what!r} answer")
        tag, value = self.conn.recv()
        assert tag == what, (tag, what)
        return value


# ---------------------------------------------------------------------------- measurements

def sgemm_peak() -> float:
    """GFLOP/s of nt's BLAS matmul on 1024 x 768 x 3072 (best of 10)."""
    from nt.kernels.cpu import matmul_forward
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 768), dtype=np.float32)
    w = rng.standard_normal((3072, 768), dtype=np.float32)
    out = np.empty((1024, 3072), np.float32)
    none = np.empty(0, np.float32)
    matmul_forward(out, x, w, none)
    best = min(_timed(matmul_forward, out, x, w, none) for _ in range(10))
    return 2 * 1024 * 768 * 3072 / best / 1e9


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


STARTUP = """
import time; t0 = time.perf_counter()
import numpy as np
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW
m = GPT2(GPT2Config.preset("tiny", vocab_size=256))
o = AdamW(m.params)
x = np.zeros((2, 16), np.int32)
m.forward(x, x); m.zero_grad(); m.backward(); o.step()
print(time.perf_counter() - t0)
"""


def startup_times() -> tuple[float, float]:
    """Seconds from interpreter start to the first finished training step, with an empty
    Numba cache (cold: every kernel compiles) and with the cache it left (warm)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", STARTUP], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return times[0], times[1]


def bench(preset, B, T, steps, warmup, compile_, peak, frameworks):
    from nt.models import GPT2
    cfg = make_config(preset, T)
    ctx = mp.get_context("spawn")
    with tempfile.NamedTemporaryFile(suffix=".f32", delete=False) as f:
        GPT2(cfg, seed=0).params.flat.tofile(f)
        weights = f.name
    try:
        workers = {name: Worker(ctx, name.split("+")[0], preset, B, T, weights, name.endswith("+compile"))
                   for name in frameworks}
        losses = {name: w.ask("loss") for name, w in workers.items()}
        ref = losses["nt"]
        for name, value in losses.items():
            if abs(value - ref) > 1e-3 * abs(ref):
                raise SystemExit(f"losses disagree before timing: {losses}")
        times = {name: [] for name in workers}
        for i in range(warmup + steps):
            for name, w in workers.items():
                dt = w.ask("step")
                if i >= warmup:
                    times[name].append(dt)
        rss = {name: w.ask("stats") for name, w in workers.items()}
    finally:
        os.unlink(weights)
    flops = flops_per_step(cfg, B, T)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = dict(ms=med * 1e3, ms_min=min(ts) * 1e3, ms_max=max(ts) * 1e3, tok_s=B * T / med,
                          gflops=flops / med / 1e9, mfu=flops / med / 1e9 / peak, rss_mb=rss[name] / 2 ** 20,
                          loss=losses[name])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=["d12:4:64", "d6:8:256"], help="preset:B:T")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--no-startup", action="store_true", help="skip the cold/warm start measurement")
    p.add_argument("--json", action="store_true", help="also print one JSON object per configuration")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    try:
        import torch  # noqa: F401
        frameworks = ["nt", "torch"] + (["torch+compile"] if args.compile else [])
    except ImportError:
        print("PyTorch is not installed: timing nt alone (pip install torch==2.13.0 to compare)")
        frameworks = ["nt"]

    peak = sgemm_peak()
    print(f"machine: {os.cpu_count()} cores; sgemm peak measured now: {peak:.0f} GFLOP/s")
    if not args.no_startup:
        cold, warm = startup_times()
        print(f"nt start to first finished step: cold (empty Numba cache) {cold:.1f} s, warm {warm:.1f} s")
    for spec in args.configs:
        preset, B, T = parse_config(spec)
        rows = bench(preset, B, T, args.steps, args.warmup, args.compile, peak, frameworks)
        print(f"\n{preset} B={B} T={T} (vocab 50257), {args.steps} timed steps after {args.warmup} warm-up")
        print(f"{'':>14} {'ms/step':>9} {'range':>15} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>5} {'RSS MB':>7}")
        for name, r in rows.items():
            print(f"{name:>14} {r['ms']:9.0f} {r['ms_min']:7.0f}-{r['ms_max']:<7.0f} {r['tok_s']:8.0f} "
                  f"{r['gflops']:8.1f} {r['mfu']:5.0%} {r['rss_mb']:7.0f}")
        if "torch" in rows:
            print(f"nt / torch eager tokens/s: {rows['nt']['tok_s'] / rows['torch']['tok_s']:.2f}x")
        if args.json:
            obj = {"config": spec, "nt_tok_s": rows["nt"]["tok_s"], "mfu": rows["nt"]["mfu"],
                   "sgemm_gflops": peak, "nt_rss_mb": rows["nt"]["rss_mb"]}
            if "torch" in rows:
                obj.update(torch_tok_s=rows["torch"]["tok_s"], ratio=rows["nt"]["tok_s"] / rows["torch"]["tok_s"],
                           torch_rss_mb=rows["torch"]["rss_mb"])
            if "torch+compile" in rows:
                obj.update(compile_tok_s=rows["torch+compile"]["tok_s"],
                           ratio_compile=rows["nt"]["tok_s"] / rows["torch+compile"]["tok_s"])
            print(json.dumps(obj))


if __name__ == "__main__":
    main()
