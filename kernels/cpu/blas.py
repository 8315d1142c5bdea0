"""BLAS ?gemm callable from inside `@njit` code, without allocating and with caching.

SciPy exports the Fortran BLAS it links (OpenBLAS) as Cython functions. We register their
addresses under fixed symbol names with llvmlite, and an intrinsic emits a direct call to
that name. Because compiled code refers to the symbol by name rather than by a ctypes
pointer baked into the function, `cache=True` works. Scalars are passed through stack slots
in the caller's frame, so a call allocates nothing.
"""
import ctypes
import glob
import os
from typing import Optional

import llvmlite.binding as llvm
import numpy as np
import scipy
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

llvm.add_symbol("nt_sgemm", get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
llvm.add_symbol("nt_dgemm", get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))

_N, _T = 78, 84  # Fortran 'N' and 'T'


@intrinsic
def _fortran_gemm(typingctx, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call sgemm or dgemm (picked by c's dtype) with column-major arguments."""
    is_single = c.dtype == types.float32
    real = types.float32 if is_single else types.float64
    if not (a.dtype == b.dtype == c.dtype and c.dtype in (types.float32, types.float64)):
        return None

    def codegen(context, builder, sig, args):
        voidptr = cgutils.voidptr_t
        fnty = ir.FunctionType(ir.VoidType(), [voidptr] * 13)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "nt_sgemm" if is_single else "nt_dgemm")

        def by_ref(i, ty):
            value = context.cast(builder, args[i], sig.args[i], ty)
            return builder.bitcast(cgutils.alloca_once_value(builder, value), voidptr)

        def data(i):
            return builder.bitcast(context.make_array(sig.args[i])(context, builder, args[i]).data, voidptr)

        i32, u8 = types.int32, types.uint8
        builder.call(fn, [by_ref(0, u8), by_ref(1, u8), by_ref(2, i32), by_ref(3, i32), by_ref(4, i32),
                          by_ref(5, real), data(6), by_ref(7, i32), data(8), by_ref(9, i32),
                          by_ref(10, real), data(11), by_ref(12, i32)])
        return context.get_dummy_value()

    return types.none(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), codegen


@njit(cache=True)
def gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    """Row-major C[M,N] = alpha * op(A) @ op(B) + beta * C, op = transpose when trans_*.

    A row-major matrix is the transpose of a column-major one, so we ask BLAS for
    C^T = op(B)^T op(A)^T: swap the operands and keep each one's transpose flag.
    """
    _fortran_gemm(np.uint8(_T if trans_b else _N), np.uint8(_T if trans_a else _N),
                  N, M, K, alpha, B, ldb, A, lda, beta, C, ldc)



def _openblas_thread_functions() -> Optional[tuple]:
    """Addresses of (get_num_threads, set_num_threads) of the OpenBLAS SciPy bundles, or
    None when SciPy links another BLAS."""
    here = os.path.dirname(scipy.__file__)
    for path in sorted(glob.glob(here + ".libs/*openblas*") + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            get = getattr(lib, prefix + "_get_num_threads", None)
            set_ = getattr(lib, prefix + "_set_num_threads", None)
            if get is not None and set_ is not None:
                return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (get, set_))
    return None


def _no_thread_control() -> tuple:
    """Stand-ins for another BLAS: one thread, and setting it does nothing."""
    one_thread = cfunc(types.intc())(lambda: 1)
    ignore = cfunc(types.void(types.intc))(lambda n: None)
    _no_thread_control.keep = (one_thread, ignore)  # the addresses must outlive this call
    return one_thread.address, ignore.address


_get_threads, _set_threads = _openblas_thread_functions() or _no_thread_control()
llvm.add_symbol("nt_blas_get_threads", _get_threads)
llvm.add_symbol("nt_blas_set_threads", _set_threads)
# Kernels that call gemm from inside their own parallel loop (attention) hold BLAS to one
# thread meanwhile: each small product then runs on its caller's core instead of waking
# OpenBLAS's thread pool for every call. With another BLAS these do nothing.
blas_get_threads = types.ExternalFunction("nt_blas_get_threads", types.intc())
blas_set_threads = types.ExternalFunction("nt_blas_set_threads", types.void(types.intc))
