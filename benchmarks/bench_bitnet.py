"""BitNet b1.58 in nt: the val-loss gap to float32 after the same training, and decode speed
and weight memory of packed ternary weights against the same model's Q8_0 and float32.

    python benchmarks/bench_bitnet.py                        # train both on llama-mini (300 steps), then decode
    python benchmarks/bench_bitnet.py --steps 0 --json r.json   # decode only (untrained weights)

Quality: train/train_llama.py runs twice on the built-in corpus with the same seed, data and
steps, once with --bitnet; the final val losses are compared.
Speed: one BitNet model (the trained llama-mini, and an untrained ~50M-parameter shape) is run
three ways, all computing with the same ternary weights (codes times scale) and its sub-norms:
  T2   nt.bitnet.pack: 2-bit codes, int8 activations per token, integer dots (kernels/cpu/bitnet.t2dot)
  Q8_0 those weights as Q8_0 blocks, int8 activations per 32 values (ggml's integer dots)
  F32  those weights as float32 matrices, float activations
Embedding, norms and classifier are float32 in all three, and all three decode through nt's
fused one-call-per-token decoder (Llama._decode_one; the benchmark asserts it). Decode = the
tokens/s of greedy generate() between its first and last new token (--new tokens after a
16-token prompt), best of --reps, the three variants interleaved, at each --threads count
(numba.set_num_threads). Prefill = forward_inference of --prefill tokens. OMP_WAIT_POLICY is
read once at start-up (nt defaults it to PASSIVE): run the benchmark once per policy, e.g.

    flock /tmp/nt-bench.lock env OMP_WAIT_POLICY=ACTIVE python benchmarks/bench_bitnet.py --steps 0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from nt import bitnet
from nt.io import latest_checkpoint, load_model
from nt.io.gguf import quantize
from nt.models import Llama, LlamaConfig

TRAIN = Path(__file__).resolve().parent.parent / "train" / "train_llama.py"


def train(out_dir: Path, steps: int, use_bitnet: bool, seed: int) -> dict:
    """Run train_llama.py on llama-mini; returns its final val loss, median ms/step and checkpoint."""
    cmd = [sys.executable, str(TRAIN), "--preset", "llama-mini", "--steps", str(steps), "--eval-every", str(steps),
           "--checkpoint-every", str(steps), "--sample-tokens", "0", "--seed", str(seed), "--out-dir", str(out_dir)]
    run = subprocess.run(cmd + (["--bitnet"] if use_bitnet else []), capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {"val_loss": [e["val_loss"] for e in log if "val_loss" in e][-1],
            "ms_per_step": statistics.median(e["ms"] for e in log if "ms" in e),
            "checkpoint": latest_checkpoint(out_dir)}


def variants(model: Llama) -> dict[str, Llama]:
    """The BitNet model as T2 (packed), Q8_0 and F32 inference models, all with its ternary weights."""
    cfg = model.config
    out = {"T2": bitnet.pack(model)}
    for kind in ("Q8_0", "F32"):
        v = Llama(cfg, seed=None, quantized={n: "Q8_0" for n in bitnet.BITLINEAR} if kind == "Q8_0" else None)
        for name, t in v.params.items():
            if name not in bitnet.BITLINEAR:
                t.data[...] = model.params[name].numpy()
        for name in bitnet.BITLINEAR:
            for l in range(cfg.n_layers):
                wq = bitnet.quantized_weight(model.params[name][l].numpy())[0]
                if kind == "Q8_0":
                    v.qweights[name][l] = quantize(wq, "Q8_0")
                else:
                    v.params[name][l].data[...] = wq
        if kind == "F32":
            v.bitlinear = frozenset()   # plain float matmuls: the weights are already ternary
        out[kind] = v.eval()
    return out


def weight_bytes(model: Llama) -> tuple[int, int]:
    """(bytes of the block projections, bytes of all weights) as the model holds them."""
    proj = sum(np.asarray(r).nbytes for rows in model.qweights.values() for r in rows)
    proj += sum(model.params[n].size * 4 for n in bitnet.BITLINEAR if n in model.params)
    return proj, proj + sum(t.size * 4 for n, t in model.params.items() if n not in bitnet.BITLINEAR)


def decode_tok_s(model: Llama, prompt: np.ndarray, new: int) -> float:
    """Greedy decoding speed: new tokens after the first (which ends the prefill) per second."""
    stamps = []
    model.generate(prompt, new, temperature=0, on_token=lambda _: stamps.append(time.perf_counter()))
    return (new - 1) / (stamps[-1] - stamps[0])


def measure(models: dict[str, Llama], new: int, reps: int, prefill: int) -> dict:
    """Best-of-reps decode tokens/s and prefill ms per variant, variants interleaved."""
    rng = np.random.default_rng(0)
    V = next(iter(models.values())).config.vocab_size
    prompt, long_prompt = rng.integers(0, V, 16), rng.integers(0, V, (1, prefill))
    best = {k: {"decode_tok_s": 0.0, "prefill_ms": float("inf")} for k in models}
    for m in models.values():   # warm-up: Numba's cache, the arenas; and every variant takes the fused step
        m.generate(prompt, 2, temperature=0)
        m.forward_inference(long_prompt)
        assert m._decode_one(int(prompt[0]), 1) is not None, "not on the fused decoder"
    for _ in range(reps):
        for k, m in models.items():
            best[k]["decode_tok_s"] = max(best[k]["decode_tok_s"], decode_tok_s(m, prompt, new))
            t0 = time.perf_counter()
            m.forward_inference(long_prompt)
            best[k]["prefill_ms"] = min(best[k]["prefill_ms"], 1e3 * (time.perf_counter() - t0))
    return best


def speed(name: str, model: Llama, args) -> list[dict]:
    models = variants(model.eval())
    memory = {k: weight_bytes(m) for k, m in models.items()}
    results = []
    for threads in args.threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        v = measure(models, args.new, args.reps, args.prefill)
        for k, (proj, total) in memory.items():
            v[k].update(projection_MB=proj / 2 ** 20, weights_MB=total / 2 ** 20)
        r = {"shape": name, "params": model.num_params, "threads": numba.get_num_threads(), "variants": v,
             "T2_vs_Q8_0_decode": v["T2"]["decode_tok_s"] / v["Q8_0"]["decode_tok_s"],
             "T2_vs_F32_decode": v["T2"]["decode_tok_s"] / v["F32"]["decode_tok_s"],
             "T2_projection_memory_vs_F32": v["T2"]["projection_MB"] / v["F32"]["projection_MB"],
             "T2_weight_memory_vs_F32": v["T2"]["weights_MB"] / v["F32"]["weights_MB"]}
        print(f"\n{name} ({model.num_params / 1e6:.1f}M parameters), {r['threads']} thread(s), OMP_WAIT_POLICY="
              f"{os.environ.get('OMP_WAIT_POLICY')}: decode {args.new} tokens after a 16-token prompt, "
              f"prefill {args.prefill} tokens")
        print(f"{'':6}{'decode tok/s':>14}{'prefill ms':>12}{'projections MB':>16}{'all weights MB':>16}")
        for k, x in v.items():
            print(f"{k:6}{x['decode_tok_s']:14.1f}{x['prefill_ms']:12.1f}{x['projection_MB']:16.2f}"
                  f"{x['weights_MB']:16.2f}")
        print(f"T2 decode: {r['T2_vs_Q8_0_decode']:.2f}x Q8_0, {r['T2_vs_F32_decode']:.2f}x F32; "
              f"projection memory {r['T2_projection_memory_vs_F32']:.3f} of F32 "
              f"(all weights {r['T2_weight_memory_vs_F32']:.3f})", flush=True)
        results.append(r)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of each model (0: no training)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new", type=int, default=128, help="tokens to decode")
    ap.add_argument("--prefill", type=int, default=128, help="prompt length of the prefill timing")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated Numba thread counts to decode with")
    ap.add_argument("--no-50m", action="store_true", help="skip the ~50M-parameter shape")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    args.threads = [int(n) for n in args.threads.split(",")]
    report = {"steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        if args.steps > 0:
            runs = {kind: train(Path(tmp) / kind, args.steps, kind == "bitnet", args.seed) for kind in ("float32", "bitnet")}
            report["quality"] = {k: {"val_loss": r["val_loss"], "ms_per_step": r["ms_per_step"]} for k, r in runs.items()}
            gap = runs["bitnet"]["val_loss"] - runs["float32"]["val_loss"]
            report["quality"]["val_loss_gap"] = gap
            print(f"llama-mini, {args.steps} steps on the built-in corpus: val loss float32 "
                  f"{runs['float32']['val_loss']:.4f}, BitNet {runs['bitnet']['val_loss']:.4f} (gap {gap:+.4f}); "
                  f"ms/step {runs['float32']['ms_per_step']:.0f} vs {runs['bitnet']['ms_per_step']:.0f}")
            mini = load_model(runs["bitnet"]["checkpoint"])
        else:
            mini = Llama(LlamaConfig.preset("llama-mini", vocab_size=4096, bitnet=True), seed=args.seed)
        report["speed"] = speed("llama-mini", mini, args)
    if not args.no_50m:
        # ~50M parameters: 8 layers of width 768 (12 heads, 4 KV heads), MLP 2048, mini's vocabulary
        cfg = LlamaConfig.preset("llama-50m", vocab_size=mini.config.vocab_size, bitnet=True)
        report["speed"] += speed("50M (untrained)", Llama(cfg, seed=args.seed), args)
    report["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
