"""Compile every CUDA kernel to PTX with the real numba-cuda compiler (no GPU needed).

The simulator runs kernels as Python, so it cannot catch what the CUDA compiler rejects
(typing, unsupported functions). This script, run by test_ptx.py in a subprocess
without NUMBA_ENABLE_CUDASIM, type-checks and compiles each kernel for the argument
types the wrappers pass. It needs libNVVM (the `nvidia-nvvm` wheel that
`pip install 'nt[cuda]'` brings, or a CUDA toolkit). Usage: python ptx_check.py [dtype ...]
"""
import os
import sys

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)

from numba import cuda, types  # noqa: E402
from numba.cuda import dispatcher  # noqa: E402


class _NoDevice:
    """Stands in for the current device: compiling a device function (block_sum, ...)
    asks it for a compute capability, which without a GPU would need a driver."""
    compute_capability = (8, 0)


dispatcher.get_current_device = _NoDevice

import nt.kernels.cuda as package  # noqa: E402
from nt.kernels.cuda import (activations, align, attention, dropout, elementwise, embedding, layernorm,  # noqa: E402
                             matmul, memory, optim, rmsnorm, rope, softmax_xent)
from nt.kernels.cuda import hebbian, vision  # noqa: E402
from numba.cuda.dispatcher import CUDADispatcher  # noqa: E402


def signatures(f):
    """(kernel, argument types) for every kernel, with float type f."""
    A1, A2, A3 = f[::1], f[:, ::1], f[:, :, ::1]
    I1, I2 = types.int32[::1], types.int32[:, ::1]
    F, I, B, D1 = types.float64, types.int64, types.boolean, types.float64[::1]
    U, L1 = types.uint64, types.int64[::1]
    return [
        (memory._fill, (A1, F)),
        (matmul._gemm_tiled, (B, B, F, A2, A2, F, A2)),
        (matmul._gemm_tiled, (B, B, F, f[:, :], f[:, :], F, f[:, :])),  # LoRA's column blocks (strided)
        (matmul._broadcast_rows, (A2, A1)),
        (matmul._sum_rows_into, (A1, A2)),
        (layernorm._layernorm_forward, (A2, A1, A1, A2, A1, A1, F)),
        (layernorm._layernorm_backward_input, (A2, A2, A2, A1, A1, A1)),
        (layernorm._layernorm_backward_params, (A1, A1, A2, A2, A1, A1)),
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
        (elementwise._scale_backward_s, (A1, A1, A1)),
        (elementwise._concat, (A2, A2, A2, B)),
        (elementwise._sum_rows_forward, (A1, A2)),
        (elementwise._sum_rows_backward, (A2, A1)),
        (dropout._dropout, (A1, A1, F, U, B)),
        (rmsnorm._rmsnorm_forward, (A2, A1, A2, A1, F)),
        (rmsnorm._rmsnorm_backward_input, (A2, A2, A2, A1, A1)),
        (rmsnorm._rmsnorm_backward_weight, (A1, A2, A2, A1)),
        (rmsnorm._qk_norm_forward, (A3, A3, A3, A1, A1, I, I, F)),
        (rmsnorm._qk_norm_backward_input, (A3, A3, A3, A1, A1, A3, I, I)),
        (rmsnorm._qk_norm_weights, (A1, A1, A3, A3, A3, I, I, I)),
        (rmsnorm._copy_values, (A3, A3, I, B)),
        (rope._rope, (A3, A3, I, I, I, D1, B, F, B)),
        (embedding._embedding_forward, (A3, I2, A2, A2, I)),
        (embedding._embedding_backward_tokens, (A2, A3, I2)),
        (embedding._embedding_backward_positions, (A2, A3, I)),
        (attention._attention_forward, (A3, A3, A3, I, I, I, I, B)),
        (attention._attention_backward_q, (A3, A3, A3, A3, A3, I, I, I, I, B)),
        (attention._attention_backward_kv, (A3, A3, A3, A3, A3, I, I, I, I, B)),
        (softmax_xent._softmax_forward, (A2, A2)),
        (softmax_xent._softmax_backward, (A2, A2, A2)),
        (softmax_xent._xent_rows, (A1, A1, A2, I1, I, F, F)),
        (softmax_xent._xent_mean, (A1, A1, I1)),
        (softmax_xent._xent_backward, (A2, A1, A2, A1, I1, I, F, F)),
        (softmax_xent._logprobs_forward, (A1, A1, A2, I1, I)),
        (softmax_xent._logprobs_backward, (A2, A1, A2, A1, I1, I)),
        (softmax_xent._kl_rows, (A1, A2, A2, A2, I1, I, F)),
        (softmax_xent._kl_backward, (A2, A1, A2, A2, A2, I1, I, F)),
        (optim._sum_squares_partial, (D1, A1)),
        (optim._sum_into_first, (D1,)),
        (optim._scale, (A1, F)),
        (optim._adam, (A1, A1, A1, A1, types.uint8[::1], L1, L1, D1, L1) + (F,) * 7),
        (optim._sgd, (A1, A1, A1, types.uint8[::1]) + (F,) * 4 + (B, B, F)),
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


def main(dtypes):
    listed = {kernel for kernel, _ in signatures(types.float32)}
    missing = sorted(k.py_func.__qualname__ for k in all_kernels() - listed)
    if missing:  # a new kernel must get its signature above
        print(f"kernels without a signature in ptx_check.py: {missing}")
        return 1
    failures = 0
    for name in dtypes:
        for kernel, sig in signatures(getattr(types, name)):
            try:
                cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0))
            except Exception as e:  # report every failing kernel, not just the first
                failures += 1
                print(f"FAIL {kernel.py_func.__module__}.{kernel.py_func.__name__} [{name}]: "
                      f"{type(e).__name__}: {str(e)[:2000]}")
    print(f"{failures} kernels failed to compile")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["float32", "float64"]))
