"""Stage 6: KV-cache decoding speed on the GPU: GPT-2 d12 (float32) and a Llama kept as
Q8_0 / Q4_0 blocks (the quantised matmuls of kernels/cuda/quant.py).

Each model: a warm-up generation (compilation, cache sizing), then `prompt` prompt tokens
(one prefill) and `new` greedy tokens, timed end to end; ms per new token excludes the
prefill (timed separately with a one-token generation).
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from common import Report, parse


def time_generation(model, prompt: int, new: int) -> dict:
    ids = np.arange(prompt, dtype=np.int32) % model.config.vocab_size
    model.generate(ids, 2, temperature=0)                      # warm-up
    t0 = time.perf_counter()
    model.generate(ids, 1, temperature=0)                      # prefill + one sample
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, new, temperature=0)
    total = time.perf_counter() - t0
    per_token = (total - prefill) / max(1, new - 1)
    return {"prompt": prompt, "new": new, "prefill_ms": 1e3 * prefill, "ms_per_token": 1e3 * per_token,
            "tokens_per_s": 1 / per_token, "tokens": out[prompt:].tolist()[:16]}


def gpt2(preset: str, V: int, prompt: int, new: int, layers: int) -> dict:
    from nt.models import GPT2, GPT2Config
    depth = {"n_layer": layers} if layers else {}   # > 0: the simulator's shallow runs
    cfg = GPT2Config.preset(preset, vocab_size=V, block_size=max(prompt + new, 64), **depth)
    return {"config": dict(preset=preset, V=V), **time_generation(GPT2(cfg, device="cuda", seed=0), prompt, new)}


def llama_quantized(kind: str, preset: str, V: int, prompt: int, new: int, layers: int) -> dict:
    """A random Llama written as a GGUF of `kind` blocks and loaded with keep_quantized on
    the GPU; its greedy tokens are compared with the same file dequantised to float32 on the
    CPU (the GPU's block matmuls keep activations float32, as that reference does)."""
    import nt
    from nt.models import Llama, LlamaConfig
    cfg = LlamaConfig.preset(preset, vocab_size=V, block_size=max(prompt + new, 64), tie_embeddings=False,
                             rope_pairing="interleaved", **({"n_layers": layers} if layers else {}))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.gguf")
        nt.models.gguf.write(path, Llama(cfg, seed=0), kind)
        gpu = nt.models.from_gguf(path, device="cuda", keep_quantized=True)
        cpu = nt.models.from_gguf(path, device="cpu")
    result = time_generation(gpu, prompt, new)
    ids = np.arange(prompt, dtype=np.int32) % V
    cpu_tokens = cpu.generate(ids, min(new, 8), temperature=0)[prompt:].tolist()
    return {"config": dict(preset=preset, V=V, kind=kind, kept=sorted(gpu.quantized)), **result,
            "same_greedy_tokens_as_cpu_float32": cpu_tokens == result["tokens"][:len(cpu_tokens)]}


def main() -> None:
    args = parse(__doc__.splitlines()[0], gpt2_preset="d12", llama_preset="llama-mini", V=50257, prompt=64, new=64,
                 layers=0)
    report = Report(args.out)
    report.attempt("gpt2_fp32", gpt2, args.gpt2_preset, args.V, args.prompt, args.new, args.layers)
    print("gpt2", {k: v for k, v in report.data["gpt2_fp32"].items() if k != "traceback"}, flush=True)
    for kind in ("Q8_0", "Q4_0"):
        report.attempt(f"llama_{kind}", llama_quantized, kind, args.llama_preset, args.V, args.prompt, args.new,
                       args.layers)
        print(kind, {k: v for k, v in report.data[f"llama_{kind}"].items() if k != "traceback"}, flush=True)


if __name__ == "__main__":
    main()
