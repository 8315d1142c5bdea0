"""A first training step compiles each kernel once: every further argument type a kernel
sees (an omitted default argument, a literal flag, a uint64 loop index, a 2-D array where
other callers pass flat ones) is one more compilation on a cold start, ~0.3-2 s each
(docs/performance.md, "Start-up").

The check runs in a fresh interpreter, so only the first steps' calls are counted (with a
warm Numba cache it takes ~3 s). It sees the kernels nt.ops calls, not their callees
(a kernel loaded from the cache brings its callees' code with it).
"""
import json
import subprocess
import sys

FIRST_STEPS = """
import json
import numpy as np
import nt.kernels.cpu as K
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.optim import AdamW
for model in (GPT2(GPT2Config.preset("tiny", vocab_size=256)), Llama(LlamaConfig.preset("llama-tiny", vocab_size=256))):
    opt = AdamW(model.params)
    x = np.zeros((2, 16), np.int32)
    model.forward(x, x); model.zero_grad(); model.backward(); opt.step()
kernels = {name: getattr(K, name) for name in dir(K)}
print(json.dumps({name: len(fn.signatures) for name, fn in kernels.items() if hasattr(fn, "signatures")}))
"""


def test_first_training_steps_compile_each_kernel_once():
    proc = subprocess.run([sys.executable, "-c", FIRST_STEPS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    specializations = json.loads(proc.stdout.strip().splitlines()[-1])
    assert specializations["matmul_forward"] == 1 and specializations["adam_update"] == 1
    assert {name: n for name, n in specializations.items() if n > 1} == {}
