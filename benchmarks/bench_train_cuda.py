"""Training speed on an NVIDIA GPU: nt against PyTorch (bf16 autocast, fused AdamW, SDPA;
eager and torch.compile) on GPT-2, tokens/s, MFU and peak device memory.

    python benchmarks/bench_train_cuda.py                     # d12, B = 16, 32, 64, T = 1024
    python benchmarks/bench_train.py --device cuda --json     # the same, from bench_train.py
    python benchmarks/bench_train_cuda.py --configs d12:8:1024 --frameworks nt nt-bf16 torch --steps 5

Each (framework, config) runs in a fresh process (its own CUDA context, so peak memory is its
own). A step is forward + backward + grad clipping (1.0) + AdamW, on one fixed random batch,
from the same initial weights. nt trains in float32 ("nt") and in bf16 mixed precision
("nt-bf16": bf16 matmul operands on cuBLAS gemm_ex, float32 accumulation, activations and
master weights; docs/cuda.md); PyTorch in bf16 autocast with float32 master weights. FLOPs per step follow
nanoGPT's estimate (bench_train.flops_per_step); MFU is against the GPU's dense bf16 peak
(a table by device name, or --peak-tflops). Needs a GPU: only the argument handling and the
arithmetic run without one (tests/cuda/test_bench_train_cuda.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.1, 1.0
FRAMEWORKS = ("nt", "nt-bf16", "torch", "torch+compile")
DEFAULT_CONFIGS = ["d12:16:1024", "d12:32:1024", "d12:64:1024"]
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, by a substring of the name
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1,
                    "A10G": 70.0, "RTX 4090": 165.2, "RTX 3090": 71.0}


def parse_config(spec: str) -> tuple[str, int, int]:
    """'d12:16:1024' -> ('d12', 16, 1024); a clear error for anything else."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) < 1 or int(parts[2]) < 1:
        raise ValueError(f"a config is preset:B:T with positive integers B and T, got {spec!r}")
    return parts[0], int(parts[1]), int(parts[2])


def peak_tflops(device_name: str, override: float = 0.0) -> float:
    """The dense bf16 peak used for MFU: `override` if given, else the table's entry whose key
    the device name contains (the longest such key, so 'H100 PCIe' wins over 'H100'); 0 if unknown."""
    if override > 0:
        return override
    keys = [k for k in BF16_PEAK_TFLOPS if k in device_name]
    return BF16_PEAK_TFLOPS[max(keys, key=len)] if keys else 0.0


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s); 0 when the peak is unknown."""
    return flops_per_step / step_seconds / (peak * 1e12) if peak > 0 else 0.0


def summarise(framework: str, spec: str, flops: float, times: list[float], peak: float, B: int, T: int,
              memory_mib: float, loss: float) -> dict:
    """One result row from the timed steps' durations (seconds)."""
    step = statistics.median(times)
    return {"framework": framework, "config": spec, "step_ms": 1e3 * step, "tokens_per_s": B * T / step,
            "mfu": mfu(flops, step, peak), "peak_tflops": peak, "peak_memory_mib": memory_mib, "loss": loss,
            "steps_timed": len(times)}


# ---------------------------------------------------------------------------- one run (child process)

def run_one(framework: str, spec: str, steps: int, warmup: int, peak_override: float) -> dict:
    import numpy as np
    sys.path.insert(0, HERE)
    from bench_train import flops_per_step, make_config
    preset, B, T = parse_config(spec)
    cfg = make_config(preset, T)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    if framework in ("nt", "nt-bf16"):
        from numba import cuda

        from nt.models import GPT2
        from nt.optim import AdamW
        model = GPT2(cfg, device="cuda", seed=0)
        model.tape.set_precision("bf16" if framework == "nt-bf16" else "fp32")
        opt = AdamW(model.params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
        free0, total = cuda.current_context().get_memory_info()
        model.zero_grad()   # once: each AdamW pass leaves the grads zero for the next backward

        def step():
            _, loss = model.forward(x, y)
            model.backward()
            # the clip factor is computed and applied on the device, inside AdamW's pass (as
            # llm.c does): nothing is read back to the host within the step
            opt.step(grad_scale=opt.clip_scale(CLIP), zero_grad=True)
            return loss

        def finish(loss):
            cuda.synchronize()
            return float(loss.numpy().reshape(-1)[0])

        name = cuda.get_current_device().name
        name = name.decode() if isinstance(name, bytes) else str(name)
        memory = lambda: (free0 - cuda.current_context().get_memory_info()[0]) / 2 ** 20  # noqa: E731
    else:
        import torch

        from nt.models import GPT2
        from torch_gpt2 import TorchGPT2
        flat = GPT2(cfg, seed=0).params.to_flat()
        model = TorchGPT2(cfg)
        model.load_nt_flat(flat)
        model = model.cuda()
        opt = model.adamw(LR, WEIGHT_DECAY)
        forward = torch.compile(model) if framework == "torch+compile" else model
        xt, yt = torch.from_numpy(x).long().cuda(), torch.from_numpy(y).long().cuda()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(xt, yt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        def finish(loss):
            torch.cuda.synchronize()
            return float(loss)

        name = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
        memory = lambda: torch.cuda.max_memory_allocated() / 2 ** 20  # noqa: E731
    for _ in range(warmup):
        finish(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = finish(step())
        times.append(time.perf_counter() - t0)
    row = summarise(framework, spec, flops_per_step(cfg, B, T), times, peak_tflops(name, peak_override), B, T,
                    memory(), loss)
    row["device"] = name
    row["dtype"] = {"nt": "float32", "nt-bf16": "bf16 matmuls, float32 activations"}.get(framework, "bf16 autocast")
    return row


# ---------------------------------------------------------------------------- driver

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="preset:B:T (GPT-2 presets)")
    p.add_argument("--frameworks", nargs="*", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (default: by device name)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per (framework, config) run")
    p.add_argument("--json", action="store_true", help="also print one JSON object per run")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file (a list, rewritten after each run)")
    p.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for spec in args.configs:
        try:
            parse_config(spec)
        except ValueError as e:
            p.error(str(e))
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:   # the child: one run, its row as the last line of output
        print(json.dumps(run_one(*args.worker, args.steps, args.warmup, args.peak_tflops)))
        return
    print(f"{'config':14s} {'framework':14s} {'step ms':>9s} {'tok/s':>10s} {'MFU':>6s} {'peak MiB':>9s} {'loss':>8s}")
    rows = []
    for spec in args.configs:
        for framework in args.frameworks:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, spec, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                    {"framework": framework, "config": spec, "error": done.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                row = {"framework": framework, "config": spec, "error": f"timed out after {args.timeout} s"}
            if "error" in row:
                print(f"{spec:14s} {framework:14s} FAILED: {row['error'].strip().splitlines()[-1:]}")
            else:
                print(f"{spec:14s} {framework:14s} {row['step_ms']:9.1f} {row['tokens_per_s']:10.0f} "
                      f"{row['mfu']:6.1%} {row['peak_memory_mib']:9.0f} {row['loss']:8.4f}")
            if args.json:
                print(json.dumps(row))
            rows.append(row)
            if args.out:   # after every run: a caller's time box may stop the next one
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
