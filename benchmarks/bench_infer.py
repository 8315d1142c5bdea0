"""Inference speed on the CPU: prefill and decode tokens/s of a LLaMA-shaped model loaded
from GGUF files in F32, F16 (dequantised to float32 at load) and Q8_0 / Q4_0 (kept
quantised: matmuls on the blocks), and PyTorch/transformers on the same shape when installed.

    python benchmarks/bench_infer.py                     # ~45M-parameter shape, 128-token prompt
    python benchmarks/bench_infer.py --dim 768 --layers 12 --ffn 2048 --prompt 256 --decode 64

Prefill: one forward over the prompt filling the KV cache. Decode: one token at a time
through the cache (greedy), the mean over --decode steps; the best of --reps runs. Each
format runs once untimed first (Numba's cache load, page faults). Weights are random:
speed does not depend on them.

On a machine shared with other work, each parallel kernel launch waits for every worker
thread to get a time slice (measured: ~20 ms per launch with 2 threads under a load
average of 8 on 2 cores, versus microseconds with 1 thread), which dominates decoding, where
every kernel is small: set NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 there.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

import nt
from nt.models import gguf
from nt.models import Llama, LlamaConfig


def run(model, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s)."""
    model.eval()
    model._begin_generation(len(prompt) + n_decode)
    tokens = list(prompt)
    t0 = time.perf_counter()
    logits = model._next_logits(tokens)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        tokens.append(int(np.argmax(logits)))
        logits = model._next_logits(tokens)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def bench_transformers(cfg: LlamaConfig, prompt: list[int], n_decode: int):
    try:
        import torch
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    except ImportError:
        print("transformers: not installed, skipped (pip install torch transformers to compare)")
        return
    torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    hf = LlamaForCausalLM(HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
                                   num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                   num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.block_size,
                                   tie_word_embeddings=cfg.tie_embeddings)).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for timed in (False, True):
            t0 = time.perf_counter()
            out = hf(ids, use_cache=True)
            t1 = time.perf_counter()
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(n_decode):
                out = hf(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
    print(f"{'transformers f32':18s} {len(prompt) / (t1 - t0):10.1f} {n_decode / (t2 - t1):10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time")
    ap.add_argument("--reps", type=int, default=3, help="runs per format; the best is reported")
    ap.add_argument("--formats", nargs="+", default=["F32", "F16", "Q8_0", "Q4_0"])
    a = ap.parse_args()
    cfg = LlamaConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_hidden=a.ffn,
                      vocab_size=a.vocab, block_size=a.prompt + a.decode, rope_pairing="interleaved",
                      tie_embeddings=False)
    src = Llama(cfg, seed=0)
    prompt = np.random.default_rng(0).integers(0, a.vocab, a.prompt).tolist()
    print(f"Llama dim={a.dim} layers={a.layers} heads={a.heads}/{a.kv_heads} ffn={a.ffn} vocab={a.vocab} "
          f"({src.num_params / 1e6:.1f}M params), prompt {a.prompt}, decode {a.decode}, "
          f"{numba.get_num_threads()} threads")
    print(f"{'format':18s} {'prefill/s':>10s} {'decode/s':>10s} {'weights MB':>11s}")
    with tempfile.TemporaryDirectory() as d:
        for fmt in a.formats:
            path = Path(d) / f"m_{fmt}.gguf"
            gguf.write(path, src, fmt)
            keep = fmt in ("Q8_0", "Q4_0")
            model = nt.models.from_gguf(path, keep_quantized=keep)
            mb = (model.params.size * 4 + sum(w.nbytes for ws in model.qweights.values()
                                               for w in (ws if isinstance(ws, list) else [ws]))) / 1e6
            run(model, prompt[:8], 2)  # warm-up
            runs = [run(model, prompt, a.decode) for _ in range(a.reps)]
            pre, dec = max(r[0] for r in runs), max(r[1] for r in runs)
            label = f"{fmt}" + (" (kept)" if keep else " (as f32)" if fmt != "F32" else "")
            print(f"{label:18s} {pre:10.1f} {dec:10.1f} {mb:11.1f}")
            del model
    bench_transformers(cfg, prompt, a.decode)


if __name__ == "__main__":
    main()
