"""cuBLAS SGEMM/DGEMM through ctypes, on Numba device arrays (row-major, like blas.py).

UNTESTED ON HARDWARE: written against the cuBLAS v2 API but never run on a GPU (the
project was developed without one). `available()` is False under the simulator or when
libcublas cannot be loaded, and matmul then uses its own tiled kernel.

The library comes from the `nvidia-cublas` wheel (`pip install 'nt[cuda]'`) or a CUDA
toolkit, found by cuda-pathfinder (a dependency of numba-cuda). The handle runs on the
legacy default stream, the one Numba launches on by default, so GEMMs and our kernels
stay ordered without synchronisation.
"""
import ctypes
import ctypes.util

import numpy as np
from numba import cuda

from .launch import SIMULATOR

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_lib = None
_handle = None
_tried = False  # look for the library once, not at every GEMM


def _load():
    """Load libcublas and create a handle once; None when there is none to load."""
    global _lib, _handle, _tried
    if _tried or SIMULATOR:
        return _handle
    _tried = True
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        path = load_nvidia_dynamic_lib("cublas").abs_path
    except Exception:  # not in a wheel or toolkit cuda-pathfinder knows
        path = None
    path = path or ctypes.util.find_library("cublas")
    if path is None:  # no cuBLAS anywhere: the tiled kernel serves
        return None
    lib = ctypes.CDLL(path)
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    for name in ("cublasSgemm_v2", "cublasDgemm_v2"):
        fn = getattr(lib, name)
        fn.restype = c_int
        fn.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_int,
                       c_void_p, c_int, c_void_p, c_void_p, c_int]
    lib.cublasCreate_v2.restype = c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(c_void_p)]
    cuda.current_context()  # cuBLAS binds to the current (primary) context: make Numba's current
    handle = c_void_p()
    status = lib.cublasCreate_v2(ctypes.byref(handle))
    if status != 0:
        raise RuntimeError(f"cublasCreate_v2 failed with status {status}")
    _lib, _handle = lib, handle
    return _handle


def available() -> bool:
    """True when GEMMs go to cuBLAS."""
    return _load() is not None


def _ptr(a) -> int:
    return a.__cuda_array_interface__["data"][0]


def _ld(a) -> int:
    """The row stride of a 2-D device array in elements (its leading dimension for cuBLAS):
    the row length for a contiguous array, more for a column block of a wider one."""
    if a.strides[1] != a.dtype.itemsize:
        raise ValueError(f"cuBLAS needs unit column stride, got strides {a.strides}")
    return max(a.strides[0] // a.dtype.itemsize, a.shape[1], 1)


def gemm(trans_a: bool, trans_b: bool, M: int, N: int, K: int, alpha: float, A, B, beta: float, C) -> None:
    """Row-major C[M,N] = alpha * op(A) @ op(B) + beta * C on 2-D device arrays with unit
    column stride (contiguous, or column blocks of wider matrices).

    cuBLAS is column-major and a row-major matrix is the transpose of a column-major one,
    so we ask for C^T = op(B)^T op(A)^T: operands swapped, each keeps its transpose flag,
    leading dimensions are the row lengths.
    """
    single = C.dtype == np.float32
    real = ctypes.c_float if single else ctypes.c_double
    fn = _lib.cublasSgemm_v2 if single else _lib.cublasDgemm_v2
    status = fn(_handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, N, M, K,
                ctypes.byref(real(alpha)), _ptr(B), _ld(B), _ptr(A), _ld(A),
                ctypes.byref(real(beta)), _ptr(C), _ld(C))
    if status != 0:
        raise RuntimeError(f"cuBLAS gemm failed with status {status} (M={M}, N={N}, K={K})")
