"""Stage 7's workload for compute-sanitizer (memcheck, racecheck): one tiny step of each
kind of kernel nt launches, so the checkers see every kernel at least once and finish in
seconds: a GPT-2 training step with AdamW (float32, then bf16 mixed precision: cuBLAS
gemm_ex and the operand casts), a Llama step (RMSNorm, RoPE, GQA, SwiGLU), a quantised
decode and the bf16 conversions. Exits non-zero if anything raised."""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse  # noqa: E402


def main() -> None:
    parse(__doc__.splitlines()[0])
    import nt
    from nt.kernels.cuda import bf16
    from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
    from nt.optim import AdamW
    import train
    rng = np.random.default_rng(0)
    for model in (GPT2(GPT2Config.preset("tiny", vocab_size=64, block_size=16), device="cuda", seed=0),
                  Llama(LlamaConfig.preset("llama-tiny", vocab_size=64, block_size=16), device="cuda", seed=0)):
        x = rng.integers(0, 64, (2, 16)).astype(np.int32)
        loss = train.step(model, AdamW(model.params, lr=1e-3), x, np.roll(x, -1, axis=1))
        print(type(model).__name__, "loss", loss)
        print("generated", model.generate(x[0, :4], 3, temperature=0))
    model = GPT2(GPT2Config.preset("tiny", vocab_size=64, block_size=16), device="cuda", seed=0)
    model.tape.set_precision("bf16")
    x = rng.integers(0, 64, (2, 16)).astype(np.int32)
    print("GPT2 bf16 loss", train.step(model, AdamW(model.params, lr=1e-3), x, np.roll(x, -1, axis=1)))
    k = nt.backend("cuda")
    x = k.to_device(rng.standard_normal(1000).astype(np.float32))
    b = k.empty(1000, np.uint16)
    bf16.to_bf16(b, x)
    bf16.to_bf16_stochastic(b, x, 1)
    bf16.from_bf16(k.empty(1000, np.float32), b)
    from nt.io import gguf
    for kind in ("Q8_0", "Q4_0"):
        wq = k.to_device(gguf.quantize(rng.standard_normal((40, 64)).astype(np.float32), kind))
        out = k.empty(2 * 40, np.float32).reshape(2, 40)
        getattr(k, f"matmul_{kind.lower()}")(out, k.to_device(rng.standard_normal((2, 64)).astype(np.float32)), wq)
        getattr(k, f"dequantize_{kind.lower()}")(k.empty(40 * 64, np.float32), wq.reshape(-1))
    k.synchronize()
    print("tiny step done")


if __name__ == "__main__":
    main()
