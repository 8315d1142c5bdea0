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

import numpy as np
from numba import cuda

from .launch import SIMULATOR

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_lib = None
_handle = None


def _load():
    """Load libcublas and create a handle once; None when there is none to load."""
    global _lib, _handle
    if _handle is not None or SIMULATOR:
        return _handle
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        loaded = load_nvidia_dynamic_lib("cublas")
        lib = ctypes.CDLL(loaded.abs_path, handle=loaded._handle_uint) if loaded.abs_path is None \
            else ctypes.CDLL(loaded.abs_path)
    except Exception:  # no wheel, no toolkit: the kernel fallback serves
        return None
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


def gemm(trans_a: bool, trans_b: bool, M: int, N: int, K: int, alpha: float, A, B, beta: float, C) -> None:
    """Row-major C[M,N] = alpha * op(A) @ op(B) + beta * C on C-contiguous 2-D device arrays.

    cuBLAS is column-major and a row-major matrix is the transpose of a column-major one,
    so we ask for C^T = op(B)^T op(A)^T: operands swapped, each keeps its transpose flag,
    leading dimensions are the row lengths.
    """
    single = C.dtype == np.float32
    real = ctypes.c_float if single else ctypes.c_double
    fn = _lib.cublasSgemm_v2 if single else _lib.cublasDgemm_v2
    status = fn(_handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, N, M, K,
                ctypes.byref(real(alpha)), _ptr(B), B.shape[1], _ptr(A), A.shape[1],
                ctypes.byref(real(beta)), _ptr(C), C.shape[1])
    if status != 0:
        raise RuntimeError(f"cuBLAS gemm failed with status {status} (M={M}, N={N}, K={K})")
