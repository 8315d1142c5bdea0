"""BLAS ?gemm and ?gemv callable from inside `@njit` code, without allocating and with caching.

We call the Fortran BLAS that SciPy bundles (OpenBLAS): its routines' addresses are
registered under fixed symbol names with llvmlite, and an intrinsic emits a direct call to
that name. Because compiled code refers to the symbol by name rather than by a ctypes
pointer baked into the function, `cache=True` works. Scalars are passed through stack slots
in the caller's frame, so a call allocates nothing.

The library is opened directly (ctypes) rather than through `scipy.linalg.cython_blas`:
importing `scipy.linalg` for four addresses cost `import nt` 15 MB of resident memory and
its LAPACK wrappers' load time. (Numba's CPU target imports scipy.linalg itself when the
first kernel runs, so a training run's peak does not change; a process that imports nt
without running a kernel, such as data preparation, stays lighter.)
"""
import ctypes
import glob
import importlib.util
import os
from typing import Optional

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import cfunc, njit, types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

ROUTINES = ("sgemm", "dgemm", "sgemv", "dgemv")


def _scipy_openblas() -> Optional[ctypes.CDLL]:
    """The OpenBLAS library SciPy's wheels bundle (scipy.libs/ or scipy/.dylibs/), opened
    without importing SciPy, or None (SciPy built against another BLAS)."""
    spec = importlib.util.find_spec("scipy")
    if spec is None or spec.origin is None:
        return None
    here = os.path.dirname(spec.origin)
    for path in sorted(glob.glob(here + ".libs/*openblas*") + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


_OPENBLAS = _scipy_openblas()


def _routine_address(name: str) -> int:
    """Address of the Fortran-ABI routine `name` (all arguments by reference, 32-bit ints):
    the bundled OpenBLAS's `scipy_<name>_` (what scipy.linalg.cython_blas itself calls), or
    SciPy's Cython export when the bundle is not found."""
    symbol = getattr(_OPENBLAS, f"scipy_{name}_", None) if _OPENBLAS is not None else None
    if symbol is not None:
        return ctypes.cast(symbol, ctypes.c_void_p).value
    return get_cython_function_address("scipy.linalg.cython_blas", name)


for _name in ROUTINES:
    llvm.add_symbol("nt_" + _name, _routine_address(_name))

_N, _T = 78, 84  # Fortran 'N' and 'T'


def _emit_blas_call(context, builder, sig, args, symbol: str, kinds: str):
    """Emit a call to the Fortran BLAS routine `symbol`: every argument by reference,
    kinds[i] telling how argument i is passed: 'c' a character, 'i' an int32, 'r' a real
    of the arrays' type, 'a' an array's data pointer. Scalars go through stack slots."""
    voidptr = cgutils.voidptr_t
    fnty = ir.FunctionType(ir.VoidType(), [voidptr] * len(kinds))
    fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
    real = next(ty.dtype for ty, k in zip(sig.args, kinds) if k == "a")
    scalar = {"c": types.uint8, "i": types.int32, "r": real}
    passed = []
    for kind, ty, value in zip(kinds, sig.args, args):
        if kind == "a":
            passed.append(builder.bitcast(context.make_array(ty)(context, builder, value).data, voidptr))
        else:
            cast = context.cast(builder, value, ty, scalar[kind])
            passed.append(builder.bitcast(cgutils.alloca_once_value(builder, cast), voidptr))
    builder.call(fn, passed)
    return context.get_dummy_value()


def _same_real(*arrays) -> bool:
    return all(a.dtype == arrays[0].dtype for a in arrays) and arrays[0].dtype in (types.float32, types.float64)


@intrinsic
def _fortran_gemm(typingctx, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call sgemm or dgemm (picked by c's dtype) with column-major arguments."""
    if not _same_real(a, b, c):
        return None
    symbol = "nt_sgemm" if c.dtype == types.float32 else "nt_dgemm"

    def codegen(context, builder, sig, args):
        return _emit_blas_call(context, builder, sig, args, symbol, "cciiiraiairai")

    return types.none(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), codegen


@intrinsic
def _fortran_gemv(typingctx, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):
    """Call sgemv or dgemv (picked by y's dtype) with column-major arguments."""
    if not _same_real(a, x, y):
        return None
    symbol = "nt_sgemv" if y.dtype == types.float32 else "nt_dgemv"

    def codegen(context, builder, sig, args):
        return _emit_blas_call(context, builder, sig, args, symbol, "ciiraiairai")

    return types.none(trans, m, n, alpha, a, lda, x, incx, beta, y, incy), codegen


@njit(cache=True)
def gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    """Row-major C[M,N] = alpha * op(A) @ op(B) + beta * C, op = transpose when trans_*.

    A row-major matrix is the transpose of a column-major one, so we ask BLAS for
    C^T = op(B)^T op(A)^T: swap the operands and keep each one's transpose flag.
    """
    _fortran_gemm(np.uint8(_T if trans_b else _N), np.uint8(_T if trans_a else _N),
                  N, M, K, alpha, B, ldb, A, lda, beta, C, ldc)


@njit(cache=True)
def gemv(trans_a, M, N, alpha, A, lda, x, beta, y):
    """Row-major y = alpha * op(A) @ x + beta * y, A (M, N) with row stride lda, x and y
    contiguous. Row-major A is column-major A^T: the transpose flag flips."""
    _fortran_gemv(np.uint8(_N if trans_a else _T), N, M, alpha, A, lda, x, 1, beta, y, 1)


def _openblas_thread_functions() -> Optional[tuple]:
    """Addresses of (get_num_threads, set_num_threads) of the OpenBLAS SciPy bundles, or
    None when SciPy links another BLAS."""
    if _OPENBLAS is None:
        return None
    for prefix in ("scipy_openblas", "openblas"):
        get = getattr(_OPENBLAS, prefix + "_get_num_threads", None)
        set_ = getattr(_OPENBLAS, prefix + "_set_num_threads", None)
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

# Numba's thread count inside a PARALLEL kernel (use it nowhere else). numba.get_num_threads()
# in a kernel calls a ctypes pointer, which keeps the kernel out of the cache; instead we
# call by name the C function behind it, `get_num_threads`, which Numba's threading layer
# registers with LLVM when its pool starts. Every parallel kernel starts the pool before its
# code is linked (at compile time, and when loaded from the cache: Numba's parfor reload
# hook), so the symbol is always there when such a kernel needs it, and `import nt` starts
# no thread pool: the OpenMP runtime is not loaded until the first parallel kernel runs, so
# a library imported after nt (PyTorch) still brings its own. Declared returning intp as
# Numba's parfor code declares it (one module cannot hold two declarations of one name).
numba_num_threads = types.ExternalFunction("get_num_threads", types.intp())
