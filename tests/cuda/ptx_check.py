"""Compile every CUDA kernel to PTX with the real numba-cuda compiler, and (with
--resources) assemble it with ptxas to check registers, spills and memory (no GPU needed).

The simulator runs kernels as Python, so it cannot catch what the CUDA compiler rejects
(typing, unsupported functions), nor what a kernel costs on a GPU. This script, run by
test_ptx.py in a subprocess without NUMBA_ENABLE_CUDASIM, type-checks and compiles each
kernel for the argument types the wrappers pass (libNVVM: the `nvidia-nvvm` wheel, or a
CUDA toolkit). With --resources it assembles each kernel's PTX for sm_80 (A100) and sm_90
(H100) with `ptxas -v` (the `nvidia-cuda-nvcc` wheel in nt[dev], or a toolkit) and fails on
register spills, a per-thread stack frame (local memory) above LOCAL_BUDGET, or static
shared memory above SHARED_LIMIT (ptxas_resources.py); it prints registers / shared / local
per kernel and arch.

Usage: python ptx_check.py [--resources] [--json FILE] [dtype ...]

To add a kernel: append (kernel, argument types) to signatures(); test_ptx.py fails while
a kernel of nt.kernels.cuda has none.
"""
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
sys.path.insert(0, os.path.dirname(__file__))

from ptxas_resources import ARCHS, LOCAL_BUDGET, SHARED_LIMIT, Ptxas, find_ptxas, problems  # noqa: E402

from numba import cuda, types  # noqa: E402
from numba.cuda import dispatcher  # noqa: E402


class _NoDevice:
    """Stands in for the current device: compiling a device function (block_sum, ...)
    asks it for a compute capability, which without a GPU would need a driver."""
    compute_capability = (8, 0)


dispatcher.get_current_device = _NoDevice

import nt.kernels.cuda as package  # noqa: E402
from nt.kernels.cuda import bitnet  # noqa: E402
from nt.kernels.cuda import (activations, align, attention, dropout, elementwise, embedding, layernorm,  # noqa: E402
                             matmul, memory, optim, rmsnorm, rope, softmax_xent)
from nt.kernels.cuda import bf16, hebbian, quant, reduce, vision  # noqa: E402
from numba.cuda.dispatcher import CUDADispatcher  # noqa: E402


def signatures(f):
    """(kernel, argument types) for every kernel, with float type f."""
    A1, A2, A3 = f[::1], f[:, ::1], f[:, :, ::1]
    I1, I2 = types.int32[::1], types.int32[:, ::1]
    F, I, B, D1, D2 = types.float64, types.int64, types.boolean, types.float64[::1], types.float64[:, ::1]
    U, L1 = types.uint64, types.int64[::1]
    return [
        (memory._fill, (A1, F)),
        (matmul._gemm_tiled, (B, B, F, A2, A2, F, A2)),
        (matmul._gemm_tiled, (B, B, F, f[:, :], f[:, :], F, f[:, :])),  # LoRA's column blocks (strided)
        (matmul._broadcast_rows, (A2, A1)),
        (reduce._sum_partials, (A1, A2)),
        (reduce._sum_rows_partial, (A2, A2, I)),
        (layernorm._layernorm_forward, (A2, A1, A1, A2, A1, A1, F)),
        (layernorm._layernorm_backward_input, (A2, A2, A2, A1, A1, A1)),
        (layernorm._layernorm_params_partial, (A3, A2, A2, A1, A1, I)),
        (layernorm._residual_layernorm_forward, (A2, A1, A1, A2, A2, A1, A1, F)),
        (layernorm._residual_layernorm_backward_input, (A2, A2, A2, A2, A1, A1, A1)),
        (activations._act_forward, (A1, A1, I)),
        (activations._act_backward, (A1, A1, A1, I)),
        (activations._glu_forward, (A2, A2, I)),
        (activations._glu_backward, (A2, A2, A2, I)),
        (elementwise._add_forward, (A1, A1, A1)),
        (elementwise._add_backward, (A1, A1, A1)),
        (elementwise._mul_forward, (A1, A1, A1)),
        (elementwise._mul_backward, (A1, A1, A1, A1, A1)),
        (elementwise._scale_forward, (A1, A1, A1)),
        (elementwise._scale_backward_x, (A1, A1, A1)),
        (elementwise._scale_backward_s_partial, (A2, A1, A1)),
        (elementwise._concat, (A2, A2, A2, B)),
        (elementwise._sum_rows_forward, (A1, A2)),
        (elementwise._sum_rows_backward, (A2, A1)),
        (elementwise._bias_act_forward, (A2, A2, A1, I)),
        (elementwise._bias_act_backward, (A2, A2, A2, I)),
        (dropout._dropout, (A1, A1, F, U, B)),
        (rmsnorm._rmsnorm_forward, (A2, A1, A2, A1, F)),
        (rmsnorm._rmsnorm_backward_input, (A2, A2, A2, A1, A1)),
        (rmsnorm._rmsnorm_weight_partial, (A2, A2, A2, A1, I)),
        (rmsnorm._qk_norm_forward, (A3, A3, A3, A1, A1, I, I, F)),
        (rmsnorm._qk_norm_backward_input, (A3, A3, A3, A1, A1, A3, I, I)),
        (rmsnorm._qk_norm_weights_partial, (A3, A3, A3, A3, I, I, I)),
        (rmsnorm._copy_values, (A3, A3, I, B)),
        (rope._rope, (A3, A3, I, I, D2, B, F, B)),
        (embedding._embedding_forward, (A3, I2, A2, A2, I)),
        (embedding._embedding_backward_tokens, (A2, A3, I2)),
        (embedding._embedding_backward_positions, (A2, A3, I)),
        (attention._attention_forward, (A3, A3, A3, I, I, I, I, B, I)),
        (attention._attention_decode, (f[:, :, :, ::1], A3, I, I, I, I, I)),
        (attention._decode_combine, (A3, A3, f[:, :, :, ::1])),
        (attention._attention_backward_d, (A3, A3, A3, I, I)),
        (attention._attention_backward_q, (A3, A3, A3, A3, A3, I, I, I, I, B, I)),
        (attention._attention_backward_kv, (A3, A3, A3, A3, A3, I, I, I, I, B, I)),
        (softmax_xent._softmax_forward, (A2, A2)),
        (softmax_xent._softmax_backward, (A2, A2, A2)),
        (softmax_xent._xent_rows, (A1, A1, A2, I1, I, F, F)),
        (softmax_xent._xent_mean, (A1, A1, I1)),
        (softmax_xent._xent_backward, (A2, A1, A2, A1, I1, I, F, F)),
        (softmax_xent._xent_grad, (A2, A1, A1, I1, I, F, F)),  # the fused classifier + loss, in place
        (softmax_xent._xent_rows_grad, (A2, A1, I1, I, F, F, F)),  # the chunked classifier's rows
        (softmax_xent._logprobs_forward, (A1, A1, A2, I1, I)),
        (softmax_xent._logprobs_backward, (A2, A1, A2, A1, I1, I)),
        (softmax_xent._kl_rows, (A1, A2, A2, A2, I1, I, F)),
        (softmax_xent._kl_backward, (A2, A1, A2, A2, A2, I1, I, F)),
        (optim._sum_squares_partial, (D1, A1)),
        (optim._sum_into_first, (D1,)),
        (optim._scale, (A1, F)),
        (optim._adam, (A1, A1, A1, A1, L1, L1, types.uint8[::1], D1, L1) + (F,) * 6 + (D1, B)),
        (optim._sgd, (A1, A1, A1, L1, types.uint8[::1]) + (F,) * 4 + (B, B, D1)),
        (optim._clip_from_sum, (D1, D1, F)),
        (optim._block_sum_squares, (D1, A1, L1)),
        (optim._segments_from_partials, (D1, D1, L1)),
        (optim._unscale_check, (D1, A1, F)),
        (optim._add_noise, (A1, L1, L1, D1, U)),
        (align._dpo_forward, (A1, A1, A1, A1, A1, F, F, I)),
        (align._dpo_backward, (A1, A1, A1, A1, A1, F, F, I)),
        (align._grpo_rows, (A1, A2, A2, A2, A1, A2, F, F, F)),
        (align._grpo_mean, (A1, A1, A2)),
        (align._grpo_backward, (A2, A1, A2, A2, A2, A1, A2, F, F, F)),
        (vision._unfold, (A3, f[:, :, :, ::1], I, B)),
        (vision._cls_pos_forward, (A3, A3, A1, A2)),
        (vision._cls_pos_backward, (A3, A1, A2, A3)),
        (vision._pool_forward, (A2, A3, B)),
        (vision._pool_backward, (A3, A2, B)),
        (vision._resize_bilinear, (f[:, :, :, ::1], types.uint8[:, :, :, ::1], F)),
        (vision._resize_bilinear, (types.uint8[:, :, :, ::1], types.uint8[:, :, :, ::1], F)),
        (vision._crop_flip, (types.uint8[:, :, :, ::1], types.uint8[:, :, :, ::1], I2, I)),
        (vision._crop_flip, (f[:, :, :, ::1], f[:, :, :, ::1], I2, F)),
        (vision._grayscale, (types.uint8[:, :, :, ::1], types.uint8[:, :, :, ::1], F)),
        (vision._grayscale, (f[:, :, :, ::1], f[:, :, :, ::1], F)),
        (vision._to_chw, (f[:, :, :, ::1], types.uint8[:, :, :, ::1], F, D1, D1)),
        (vision._to_chw, (f[:, :, :, ::1], f[:, :, :, ::1], F, D1, D1)),
        (hebbian._hebbian_update, (A2, A2, A2, F, F, B)),
        (quant._block_matmul, (types.float32[:, ::1], types.float32[:, ::1], types.uint8[:, ::1], B)),
        (quant._dequantize, (types.float32[::1], types.uint8[::1], B)),
        (bf16._to_bf16, (types.uint16[:, ::1], types.uint32[:, ::1], B, U)),
        (bf16._to_bf16, (types.uint16[:, ::1], types.uint32[:, :], B, U)),   # a column block (bf16 matmul operand)
        (bf16._from_bf16, (types.uint32[::1], types.uint16[::1])),
        (bitnet._weight_scale, (A1, A1)),
        (bitnet._weight_apply, (A1, A1, A1)),
        (bitnet._act_quant, (A2, A1, A2)),
    ]


def all_kernels():
    """Every kernel (not device function) defined in the package's modules."""
    found = set()
    for mod in vars(package).values():
        if getattr(mod, "__name__", "").startswith("nt.kernels.cuda."):
            for obj in vars(mod).values():
                if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device"):
                    found.add(obj)
    return found


# Float32 builds of these modules' kernels must do no float64 arithmetic (a float64 op runs
# at 1/64 of the float32 rate on consumer GPUs); elsewhere float64 is reported, and where a
# kernel of these modules needs it, FLOAT64_NEEDED says why (a test depends on it).
FLOAT32_MODULES = {"activations", "attention", "bf16", "dropout", "elementwise", "embedding", "hebbian", "layernorm",
                   "matmul", "memory", "optim", "quant", "reduce", "rmsnorm", "rope"}
FLOAT64_NEEDED = {
    "rope._rope": "reads the op's float64 cos/sin table once per (position, pair) and converts it: "
                  "float32 angles of positions near 10^5 are off by ~1e-2 rad (the rotation is float32)",
    "dropout._dropout": "the mask compares a 53-bit uniform with p, bit-identical to the CPU's masks "
                        "(test_kernels' dropout test); one compare per element",
    "optim._adam": "the bias corrections 1 - beta^t, once per table block (the update is float32)",
    "optim._add_noise": "Box-Muller on 53-bit uniforms: the CPU's noise numbers exactly",
    "optim._sum_squares_partial": "grad-norm sums of squares over ~10^8 elements in float64, as the CPU",
    "optim._block_sum_squares": "per-tensor sums of squares in float64 (Chuck's norms), as the CPU",
    "optim._sum_into_first": "adds float64 partials",
    "optim._clip_from_sum": "one thread: the clip factor from the float64 sum of squares, the CPU's rule",
    "optim._segments_from_partials": "adds float64 partials",
    "optim._unscale_check": "inf/NaN counts into the caller's float64 partials (the unscale is float32)",
    "bf16._to_bf16": "stochastic rounding's 16 random bits are dropout's 53-bit uniform times 2^16 "
                     "(one multiply per element; the rounding itself is integer)",
}
_F64_OP = re.compile(r"^\s*(?!ld\.|st\.|mov\.|cvt\.)[a-z][\w.]*\.f64\b", re.M)


def float64_ops(ptx: str) -> int:
    """Float64 arithmetic and comparison instructions in a PTX module (loads, stores, moves
    and conversions not counted: a float64 kernel argument is converted once, and any
    float64 math on it shows up as arithmetic)."""
    return len(_F64_OP.findall(ptx))


def check_float32(compiled) -> list:
    """Failure lines for float32 kernels of FLOAT32_MODULES that do float64 arithmetic."""
    failures = []
    for name, ptx in compiled:
        module = name.split(".")[0]
        base = name.split(" ")[0].split("#")[0]
        if name.endswith("[float32]") and module in FLOAT32_MODULES and base not in FLOAT64_NEEDED:
            n = float64_ops(ptx)
            if n:
                failures.append(f"FAIL {name}: {n} float64 instructions in a float32 kernel")
    return failures


def check_resources(compiled, ptxas, options=()) -> tuple:
    """Assemble every (name, ptx) for each arch in ARCHS (in parallel: ptxas is one process
    per module); returns ({name: {arch: resources}}, [failure lines])."""
    jobs = [(name, ptx, arch) for name, ptx in compiled for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: ptxas.resources(job[1], job[2], options), jobs))
    table, failures = {}, []
    for (name, ptx, arch), res in zip(jobs, results):
        table.setdefault(name, {})[arch] = dict(res, float64_ops=float64_ops(ptx))
        failures += [f"FAIL {name} {arch}: {why}" for why in problems(res)]
    return table, failures


def _print_table(table):
    print(f"{'kernel':58s}" + "".join(f"{arch + ' regs/smem/stack':>24s}" for arch in ARCHS) + "  f64 ops")
    for name, per_arch in table.items():
        columns = "".join(f"{per_arch[a]['registers']:>10d}{per_arch[a]['shared']:>8d}{per_arch[a]['stack']:>6d}"
                          for a in ARCHS)
        print(f"{name:58s}{columns}{per_arch[ARCHS[0]]['float64_ops']:>9d}")


def main(argv):
    want_resources = "--resources" in argv
    json_out = argv[argv.index("--json") + 1] if "--json" in argv else None
    dtypes = [a for a in argv if not a.startswith("--") and a != json_out] or ["float32", "float64"]
    listed = {kernel for kernel, _ in signatures(types.float32)}
    missing = sorted(k.py_func.__qualname__ for k in all_kernels() - listed)
    if missing:  # a new kernel must get its signature above
        print(f"FAIL kernels without a signature in ptx_check.py: {missing}")
    ptxas = None
    if want_resources:
        path = find_ptxas()
        if path is None:
            print("ptxas not found (pip install nvidia-cuda-nvcc, in nt[dev])")
            return 1
        ptxas = Ptxas(path)
    failures, compiled = len(missing), []
    for dtype in dtypes:
        seen = {}
        for kernel, sig in signatures(getattr(types, dtype)):
            name = f"{kernel.py_func.__module__.rsplit('.', 1)[-1]}.{kernel.py_func.__name__}"
            seen[name] = seen.get(name, 0) + 1
            name += f"#{seen[name]} [{dtype}]" if seen[name] > 1 else f" [{dtype}]"
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0))
                compiled.append((name, ptx))
            except Exception as e:  # report every failing kernel, not just the first
                failures += 1
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{failures} kernels failed to compile")
    wide = check_float32(compiled)
    print("\n".join(wide))
    print(f"{len(wide)} float32 kernels with float64 arithmetic in {sorted(FLOAT32_MODULES)}")
    failures += len(wide)
    if ptxas is not None:
        table, over = check_resources(compiled, ptxas)
        ptxas.save()
        _print_table(table)
        print("\n".join(over))
        print(f"{len(over)} resource-check failures (budgets: no spills, stack <= {LOCAL_BUDGET} B, "
              f"static shared <= {SHARED_LIMIT} B)")
        if json_out:
            with open(json_out, "w") as f:
                json.dump(table, f, indent=1)
        failures += len(over)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
