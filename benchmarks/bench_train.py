"""Training-step speed of nt against PyTorch on the same model, side by side in one run.

    python benchmarks/bench_train.py                      # every default config, clip on and off
    python benchmarks/bench_train.py --quick --json       # fewer steps, no start-up timing
    python benchmarks/bench_train.py --configs llama-mini:8:256 --no-clip --no-compile
    python benchmarks/bench_train.py --device cuda        # on a GPU: bench_train_cuda.py and its options
    python benchmarks/bench_train.py --configs mini:16:128 --steps 5 --json
    python benchmarks/bench_train.py --torch-passive       # on a machine shared with other jobs

Configs are preset:B:T. GPT-2 presets (d12, d6, mini, ...) run against benchmarks/torch_gpt2.py;
the LLaMA shapes (LLAMA_SHAPES: llama-mini, smollm2-135m, llama3-gqa) against
benchmarks/torch_llama.py, the same architecture (RMSNorm, half-split RoPE, SwiGLU, GQA
through SDPA). Each framework runs in its own spawned worker process (so peak RSS is its
own) on the same weights and the same batch; the losses must agree before anything is
timed. Timed steps alternate nt, torch, torch.compile, and clipping on, off, so drift in
the machine's speed hits all alike. A step is forward + backward + (grad clipping to norm
1) + AdamW with llm.c's settings (nt zeroes the grads inside AdamW's pass); PyTorch uses
AdamW(fused=True) and zero_grad(set_to_none=True). FLOPs follow nanoGPT's
estimate (6 N + 12 L C T per token, N without position embeddings, C the attention width);
MFU is against the best sgemm rate the run has measured (at its start and beside each config) with nt's own BLAS call.
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
# The thread settings `import nt` may put into os.environ (OPENBLAS_THREAD_TIMEOUT; earlier
# versions also OMP_WAIT_POLICY), as they were before nt was imported. Spawned workers
# inherit the parent's environment, and the parent imports nt (the sgemm rate, the configs)
# before it starts them; PyTorch must run with the user's own settings, so its worker puts
# these values back before `import torch`.
NT_THREAD_ENV = ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")
USER_THREAD_ENV = {name: os.environ.get(name) for name in NT_THREAD_ENV}
DEFAULT_CONFIGS = ["d12:4:64", "d6:8:256", "llama-mini:8:256", "smollm2-135m:4:256", "llama3-gqa:4:256"]
# LLaMA shapes: (nt preset, overrides). llama-mini gets a real vocabulary (Llama-2's 32000);
# llama3-gqa is Llama-3.2's attention (4 query heads per kv head, theta 500000, Llama-3's
# RoPE scaling) at a laptop size.
LLAMA_SHAPES = {
    "llama-mini": ("llama-mini", dict(vocab_size=32000)),
    "smollm2-135m": ("smollm2-135m", {}),
    "llama3-gqa": ("llama3.2-1b", dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=1536,
                                       vocab_size=32000, block_size=8192)),
}


def parse_config(spec: str):
    """'d12:4:64' -> (preset, B, T)."""
    preset, B, T = spec.split(":")
    return preset, int(B), int(T)


def is_llama(preset: str) -> bool:
    return preset in LLAMA_SHAPES


def make_config(preset: str, T: int):
    """The nt config of a benchmark preset, its block size at least T."""
    if is_llama(preset):
        from nt.models import LlamaConfig
        name, overrides = LLAMA_SHAPES[preset]
        cfg = LlamaConfig.preset(name, **overrides)
        cfg.block_size = max(cfg.block_size, T)
        return cfg
    from nt.models import GPT2Config
    return GPT2Config.preset(preset, vocab_size=50257, block_size=max(T, 64))


def make_nt_model(cfg, seed):
    from nt.models import GPT2, Llama
    return Llama(cfg, seed=seed) if hasattr(cfg, "dim") else GPT2(cfg, seed=seed)


def batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)


def flops_per_step(cfg, B, T) -> float:
    """nanoGPT's 6 N + 12 L C T per token (C: the attention width), times B T tokens."""
    if hasattr(cfg, "dim"):  # LLaMA: tied classifier, no position embeddings
        C, L, H, A = cfg.dim, cfg.n_layers, cfg.ffn_hidden, cfg.n_heads * cfg.hs
        n = cfg.vocab_size * C + L * (C * cfg.qkv_width + A * C + 3 * C * H + 2 * C) + C
    else:
        C, L = cfg.n_embd, cfg.n_layer
        A = C
        n = cfg.vocab_size * C + L * (12 * C * C + 13 * C) + 2 * C  # params without wpe, real V
    return (6 * n + 12 * L * A * T) * B * T


# ---------------------------------------------------------------------------- workers

def worker(conn, framework: str, preset: str, B: int, T: int, weights: str, compile_: bool,
           user_env: dict):
    """Build one framework's model from `weights` and serve commands: loss, step, stats."""
    if framework == "torch":
        # PyTorch must load its own OpenMP runtime with the user's thread settings (not ones
        # inherited from the parent, see USER_THREAD_ENV), and before nt (imported by
        # make_config) starts Numba's libgomp: on a passive runtime PyTorch's ops ran 1.45x
        # slower on d12.
        for name, value in user_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        import torch  # noqa: F401
    cfg = make_config(preset, T)
    x, y = batch(cfg, B, T)
    flat = np.fromfile(weights, dtype=np.float32)
    if framework == "nt":
        from nt.optim import AdamW
        model = make_nt_model(cfg, seed=None)
        model.load_flat(flat)
        opt = AdamW(model.params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
        model.zero_grad()  # once: from then on each update leaves the grads zero

        def loss():
            return model(x, y)[1]

        def step(clip: bool):
            model.forward(x, y)
            model.backward()
            # the clip factor is made beside the grads and applied inside the AdamW kernel
            # (as llm.c does), whose pass also leaves the grads zero for the next backward
            # (PyTorch's zero_grad(set_to_none=True) costs no pass either)
            opt.step(grad_scale=opt.clip_scale(CLIP) if clip else 1.0, zero_grad=True)
    else:
        import torch
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
        torch.manual_seed(0)
        if is_llama(preset):
            from torch_llama import TorchLlama as Model
        else:
            from torch_gpt2 import TorchGPT2 as Model
        model = Model(cfg)
        model.load_nt_flat(flat)
        opt = model.adamw(LR, WEIGHT_DECAY)
        run = torch.compile(model) if compile_ else model
        tx, ty = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

        def loss():
            with torch.no_grad():
                return float(run(tx, ty))

        def step(clip: bool):
            l = run(tx, ty)
            l.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    del flat  # the weight file's copy is not part of the model's footprint
    reset_peak_rss()
    conn.send(("ready", None))
    while True:
        cmd, arg = conn.recv()
        if cmd == "loss":
            conn.send(("loss", loss()))
        elif cmd == "step":
            t0 = time.perf_counter()
            step(arg)
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

    def ask(self, cmd, arg=None):
        self.conn.send((cmd, arg))
        return self.expect(cmd)

    def expect(self, what):
        if not self.conn.poll(1800):
            raise RuntimeError(f"worker gave no {what!r} answer")
        tag, value = self.conn.recv()
        assert tag == what, (tag, what)
        return value


# ---------------------------------------------------------------------------- measurements

def sgemm_peak() -> float:
    """GFLOP/s of nt's BLAS matmul on 1024 x 768 x 3072 (best of 10): the rate MFU is against."""
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
import sys, time; t0 = time.perf_counter()
import numpy as np
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.optim import AdamW
if sys.argv[1] == "llama":
    m = Llama(LlamaConfig.preset("llama-tiny", vocab_size=256))
else:
    m = GPT2(GPT2Config.preset("tiny", vocab_size=256))
o = AdamW(m.params)
x = np.zeros((2, 16), np.int32)
m.forward(x, x); m.zero_grad(); m.backward(); o.step()
print(time.perf_counter() - t0)
"""


def startup_times(family: str) -> tuple[float, float]:
    """Seconds from interpreter start to the first finished training step of a tiny
    `family` model ("gpt2" or "llama"), with an empty Numba cache (cold: every kernel
    compiles) and with the cache it left (warm)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", STARTUP, family], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return times[0], times[1]


def bench(preset, B, T, steps, warmup, peak, frameworks, clips, torch_env):
    """Median step times of every framework under every clip mode, interleaved:
    {(framework, clip): row}. PyTorch's workers start with the thread settings torch_env."""
    cfg = make_config(preset, T)
    ctx = mp.get_context("spawn")
    with tempfile.NamedTemporaryFile(suffix=".f32", delete=False) as f:
        make_nt_model(cfg, seed=0).params.flat.tofile(f)
        weights = f.name
    try:
        workers = {name: Worker(ctx, name.split("+")[0], preset, B, T, weights, name.endswith("+compile"),
                                torch_env)
                   for name in frameworks}
        losses = {name: w.ask("loss") for name, w in workers.items()}
        ref = losses["nt"]
        for name, value in losses.items():
            if abs(value - ref) > 1e-3 * abs(ref):
                raise SystemExit(f"{preset}: losses disagree before timing: {losses}")
        times = {(name, clip): [] for name in workers for clip in clips}
        for i in range(warmup + steps):
            for clip in clips:
                for name, w in workers.items():
                    dt = w.ask("step", clip)
                    if i >= warmup:
                        times[name, clip].append(dt)
        rss = {name: w.ask("stats") for name, w in workers.items()}
    finally:
        os.unlink(weights)
    flops = flops_per_step(cfg, B, T)
    rows = {}
    for (name, clip), ts in times.items():
        med = statistics.median(ts)
        rows[name, clip] = dict(ms=med * 1e3, ms_min=min(ts) * 1e3, ms_max=max(ts) * 1e3, tok_s=B * T / med,
                                gflops=flops / med / 1e9, mfu=flops / med / 1e9 / peak,
                                rss_mb=rss[name] / 2 ** 20, loss=losses[name])
    return rows


def report(spec, rows, clip, peak, steps, warmup, as_json):
    """Print one config's table for one clip mode (and its JSON line)."""
    preset, B, T = parse_config(spec)
    cfg = make_config(preset, T)
    mine = {name: r for (name, c), r in rows.items() if c == clip}
    print(f"\n{preset} B={B} T={T} (vocab {cfg.vocab_size}), clipping {'on' if clip else 'off'}, "
          f"{steps} timed steps after {warmup} warm-up")
    print(f"{'':>14} {'ms/step':>9} {'range':>15} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>5} {'RSS MiB':>7}")
    for name, r in mine.items():
        print(f"{name:>14} {r['ms']:9.0f} {r['ms_min']:7.0f}-{r['ms_max']:<7.0f} {r['tok_s']:8.0f} "
              f"{r['gflops']:8.1f} {r['mfu']:5.0%} {r['rss_mb']:7.0f}")
    nt = mine["nt"]
    line = f"nt: MFU {nt['mfu']:.0%} of the best sgemm rate measured so far ({peak:.0f} GFLOP/s)"
    if "torch" in mine:
        line += f"; tokens/s {nt['tok_s'] / mine['torch']['tok_s']:.2f}x PyTorch eager"
    if "torch+compile" in mine:
        line += f", {nt['tok_s'] / mine['torch+compile']['tok_s']:.2f}x torch.compile"
    print(line)
    if as_json:
        obj = {"config": spec, "clip": clip, "nt_tok_s": nt["tok_s"], "mfu": nt["mfu"], "sgemm_gflops": peak,
               "nt_rss_mb": nt["rss_mb"], "nt_peak_rss_mib": nt["rss_mb"], "nt_ms": nt["ms"],
               "nt_ms_min": nt["ms_min"]}
        # the fastest steps too: on a machine shared with other jobs the minimum is the
        # least disturbed estimate (the medians and ratios are still of the same run)
        if "torch" in mine:
            obj.update(torch_tok_s=mine["torch"]["tok_s"], ratio=nt["tok_s"] / mine["torch"]["tok_s"],
                       torch_rss_mb=mine["torch"]["rss_mb"], torch_ms_min=mine["torch"]["ms_min"],
                       ratio_min=mine["torch"]["ms_min"] / nt["ms_min"])
        if "torch+compile" in mine:
            obj.update(compile_tok_s=mine["torch+compile"]["tok_s"],
                       ratio_compile=nt["tok_s"] / mine["torch+compile"]["tok_s"],
                       compile_rss_mb=mine["torch+compile"]["rss_mb"],
                       compile_ms_min=mine["torch+compile"]["ms_min"],
                       ratio_compile_min=mine["torch+compile"]["ms_min"] / nt["ms_min"])
        print(json.dumps(obj))


def main(argv=None):
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    known, argv = device.parse_known_args(argv)
    if known.device == "cuda":  # the GPU benchmark has its own options: see bench_train_cuda.py
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_train_cuda
        return bench_train_cuda.main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                   help=f"preset:B:T; GPT-2 presets or one of {sorted(LLAMA_SHAPES)}")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up, no start-up timing")
    p.add_argument("--no-clip", action="store_true", help="time without gradient clipping only (llm.c's reference)")
    p.add_argument("--clip-only", action="store_true", help="time with gradient clipping only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-startup", action="store_true", help="skip the cold/warm start measurement")
    p.add_argument("--torch-passive", action="store_true",
                   help="run PyTorch with OMP_WAIT_POLICY=PASSIVE as nt does: faster for PyTorch on a machine "
                        "shared with other jobs (its spinning OpenMP workers lose their time slices), slower on "
                        "a quiet one; the default is the user's own setting")
    p.add_argument("--json", action="store_true", help="also print one JSON object per configuration and clip mode")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.no_startup = 3, 1, True
    if args.no_clip and args.clip_only:
        p.error("--no-clip and --clip-only exclude each other")
    clips = [False] if args.no_clip else [True] if args.clip_only else [True, False]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    try:
        import torch  # noqa: F401
        frameworks = ["nt", "torch"] + ([] if args.no_compile else ["torch+compile"])
    except ImportError:
        print("PyTorch is not installed: timing nt alone (pip install torch==2.13.0 to compare)")
        frameworks = ["nt"]

    peak = sgemm_peak()
    print(f"machine: {os.cpu_count()} cores; sgemm peak measured now: {peak:.0f} GFLOP/s; PyTorch's OpenMP "
          f"wait policy: {'PASSIVE' if args.torch_passive else USER_THREAD_ENV['OMP_WAIT_POLICY'] or 'default'}")
    if not args.no_startup:
        for family in sorted({"llama" if is_llama(parse_config(s)[0]) else "gpt2" for s in args.configs}):
            cold, warm = startup_times(family)
            print(f"nt {family} start to first finished step: cold (empty Numba cache) {cold:.1f} s, warm {warm:.1f} s")
    for spec in args.configs:
        preset, B, T = parse_config(spec)
        # the probe again beside each config: the VM's speed drifts over a run by up to ~20%,
        # and MFU is against the best rate the run has seen (a probe taken in a slow moment
        # would otherwise print an MFU above 100%)
        peak = max(peak, sgemm_peak())
        torch_env = {**USER_THREAD_ENV, "OMP_WAIT_POLICY": "PASSIVE"} if args.torch_passive else USER_THREAD_ENV
        rows = bench(preset, B, T, args.steps, args.warmup, peak, frameworks, clips, torch_env)
        for clip in clips:
            report(spec, rows, clip, peak, args.steps, args.warmup, args.json)


if __name__ == "__main__":
    main()
