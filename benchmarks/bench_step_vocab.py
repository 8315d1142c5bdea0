"""Step time of the default GPT-2 preset with byte tokens (V=256) vs BPE vocabularies, at
the same B and T, interleaved (the VM's speed drifts). Bytes per step is what matters:
a BPE token of the built-in corpus covers ~4 bytes.

    python benchmarks/bench_step_vocab.py --preset mini -B 16 -T 64 --vocabs 256 4096 8192
"""
import argparse
import time

import numpy as np

from nt.models import GPT2, GPT2Config
from nt.optim import AdamW


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mini")
    p.add_argument("-B", type=int, default=16)
    p.add_argument("-T", type=int, default=64)
    p.add_argument("--vocabs", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    runs = {}
    for V in args.vocabs:
        model = GPT2(GPT2Config.preset(args.preset, vocab_size=V))
        runs[V] = (model, AdamW(model.params, lr=1e-3), rng.integers(0, V, (2, args.B, args.T)).astype(np.int32))
    times = {V: [] for V in args.vocabs}
    for _ in range(args.rounds):
        for V, (model, opt, (x, y)) in runs.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                model.forward(x, y)
                model.zero_grad()
                model.backward()
                opt.step()
                times[V].append(time.perf_counter() - t0)
    for V, ts in times.items():
        med = float(np.median(ts[1:]))
        print(f"V={V:6d}  median step {med * 1e3:8.1f} ms  {args.B * args.T / med:8.0f} tok/s")


if __name__ == "__main__":
    main()
