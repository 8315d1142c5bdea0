"""Stage 5: GPT-2 training on the GPU against the CPU, then where a GPU step's time goes.

Parity: the same model, batch and AdamW on both devices, `steps` steps (forward, backward,
grad clipping, update) on one fixed batch; the float32 loss curves must agree to 1e-4, and
the GPU's bf16 mixed-precision curve (tape precision "bf16") must stay within 2e-2 of the
CPU's float32 one.
Timing: a larger config on the GPU alone; the median step time (host clock around a
synchronised step) against the summed kernel time of the same step from nt.profile, which
synchronises around each kernel call: wall minus kernels is the host's share (Python,
launches, transfers), the number that tells whether the GPU waits on the host.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from common import Report, parse

LR, CLIP = 1e-3, 1.0


def build(preset: str, B: int, T: int, V: int, device: str, layers: int = 0, precision: str = "fp32"):
    """Model, AdamW and one batch; `layers` > 0 overrides the preset's depth (the simulator's runs)."""
    from nt.models import GPT2, GPT2Config
    from nt.optim import AdamW
    cfg = GPT2Config.preset(preset, vocab_size=V, block_size=T, **({"n_layer": layers} if layers else {}))
    model = GPT2(cfg, device=device, seed=0)
    model.tape.set_precision(precision)
    opt = AdamW(model.params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (B, T)).astype(np.int32)
    return model, opt, x, np.roll(x, -1, axis=1)


def step(model, opt, x, y) -> float:
    """One training step; its loss (read back to the host, which also synchronises). The
    clip factor stays on the device (opt.clip_scale, applied inside AdamW's pass)."""
    _, loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    opt.step(grad_scale=opt.clip_scale(CLIP))
    return float(loss.numpy().reshape(-1)[0])


def parity(report: Report, preset: str, B: int, T: int, V: int, steps: int, layers: int) -> dict:
    curves, times = {}, {}
    for run, device, precision in (("cpu", "cpu", "fp32"), ("cuda", "cuda", "fp32"), ("cuda_bf16", "cuda", "bf16")):
        model, opt, x, y = build(preset, B, T, V, device, layers, precision)
        curves[run], times[run] = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            curves[run].append(step(model, opt, x, y))
            times[run].append(time.perf_counter() - t0)
            report.set("parity_progress", {"curves": curves})
    diff = [abs(a - b) for a, b in zip(curves["cpu"], curves["cuda"])]
    diff_bf16 = [abs(a - b) for a, b in zip(curves["cpu"], curves["cuda_bf16"])]
    return {"config": dict(preset=preset, B=B, T=T, V=V, steps=steps, dtype="float32"), "loss_cpu": curves["cpu"],
            "loss_cuda": curves["cuda"], "max_abs_diff": max(diff), "target": 1e-4, "ok": max(diff) <= 1e-4,
            "loss_cuda_bf16": curves["cuda_bf16"], "max_abs_diff_bf16": max(diff_bf16), "target_bf16": 2e-2,
            "ok_bf16": max(diff_bf16) <= 2e-2,
            **{f"step_ms_{run}": 1e3 * statistics.median(t[1:] or t) for run, t in times.items()}}


def timing(preset: str, B: int, T: int, V: int, steps: int, profiled: int, layers: int) -> dict:
    import nt.profile
    model, opt, x, y = build(preset, B, T, V, "cuda", layers)
    step(model, opt, x, y)                        # warm-up: compilation, arena sizing
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, opt, x, y)
        walls.append(time.perf_counter() - t0)
    with nt.profile.Profiler(model, opt) as prof:
        for _ in range(profiled):
            step(model, opt, x, y)
    kernels = sorted(((name, calls / profiled, 1e3 * secs / profiled) for name, (calls, secs) in prof.stats.items()),
                     key=lambda r: -r[2])
    wall_ms, kernel_ms = 1e3 * statistics.median(walls), sum(ms for _, _, ms in kernels)
    tokens = B * T
    return {"config": dict(preset=preset, B=B, T=T, V=V, steps=steps, dtype="float32"),
            "step_ms": wall_ms, "tokens_per_s": tokens / (wall_ms / 1e3),
            "kernel_ms_per_step": kernel_ms, "host_overhead_ms": wall_ms - kernel_ms,
            "host_share": (wall_ms - kernel_ms) / wall_ms,
            "kernels": [{"kernel": n, "calls_per_step": c, "ms_per_step": ms} for n, c, ms in kernels[:25]]}


def main() -> None:
    args = parse(__doc__.splitlines()[0], preset="mini", B=4, T=128, V=50257, steps=20,
                 time_preset="d12", time_B=8, time_T=1024, time_steps=10, profiled=3, layers=0)
    report = Report(args.out)
    report.attempt("parity", parity, report, args.preset, args.B, args.T, args.V, args.steps, args.layers)
    print({k: v for k, v in report.data["parity"].items() if not k.startswith("loss")}, flush=True)
    report.attempt("timing", timing, args.time_preset, args.time_B, args.time_T, args.V, args.time_steps,
                   args.profiled, args.layers)
    print({k: v for k, v in report.data["timing"].items() if k != "kernels"}, flush=True)


if __name__ == "__main__":
    main()
