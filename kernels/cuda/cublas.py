"""cuBLAS SGEMM/DGEMM (and GemmEx for bf16) through ctypes, on Numba device arrays (row-major, like blas.py).

Required on a GPU: if libcublas cannot be loaded or cublasCreate fails, the first GEMM
raises a RuntimeError saying so (nt never falls back to a slow kernel silently). Under the
simulator there is no cuBLAS and matmul.py uses its tiled kernel instead. Written against
the cuBLAS v2 API and compiled, but not yet run on a GPU (docs/cuda.md).

The library comes from the `nvidia-cublas` wheel (`pip install 'nt[cuda]'`) or a CUDA
toolkit, found by cuda-pathfinder (a dependency of numba-cuda). The handle runs on the
legacy default stream, the one Numba launches on by default, so GEMMs and our kernels
stay ordered without synchronisation. Float32 GEMMs use full float32 math unless
set_tf32(True) allows TF32 tensor cores (10-bit mantissa inputs, faster on sm_80+).
bf16 operands (uint16 bits) with a float32 output go to cublasGemmEx with CUDA_R_16BF
inputs and CUBLAS_COMPUTE_32F (bf16 tensor cores, float32 accumulation).
"""
import ctypes
import ctypes.util

import numpy as np
from numba import cuda

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_DEFAULT_MATH, _TF32_TENSOR_OP_MATH = 0, 3  # cublasMath_t
_R_32F, _R_16BF = 0, 14  # cudaDataType_t
_COMPUTE_32F = 68  # cublasComputeType_t: float32 accumulation (bf16 inputs still use tensor cores)
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t: the library's heuristic
_lib = None
_handle = None
_error = None  # why cuBLAS could not be loaded, once tried
_tf32 = False


def _load():
    """Load libcublas and create a handle once; raise (every call) if that failed."""
    global _lib, _handle, _error
    if _handle is not None:
        return
    if _error is None:
        try:
            _lib, _handle = _open()
            _set_math_mode()
            return
        except Exception as e:  # remembered: every later GEMM reports the same cause
            _error = f"{type(e).__name__}: {e}"
    raise RuntimeError(f"cuBLAS is required for matmuls on a GPU and could not be loaded ({_error}); "
                       "pip install 'nt[cuda]' (the nvidia-cublas wheel) or install a CUDA toolkit")


def _open():
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        path = load_nvidia_dynamic_lib("cublas").abs_path
    except Exception:  # not in a wheel or toolkit cuda-pathfinder knows
        path = None
    path = path or ctypes.util.find_library("cublas")
    if path is None:
        raise OSError("libcublas not found")
    lib = ctypes.CDLL(path)
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    for name in ("cublasSgemm_v2", "cublasDgemm_v2"):
        fn = getattr(lib, name)
        fn.restype = c_int
        fn.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_int,
                       c_void_p, c_int, c_void_p, c_void_p, c_int]
    lib.cublasGemmEx.restype = c_int
    lib.cublasGemmEx.argtypes = [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_int, c_int,
                                 c_void_p, c_int, c_int, c_void_p, c_void_p, c_int, c_int, c_int, c_int]
    lib.cublasCreate_v2.restype = c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(c_void_p)]
    lib.cublasSetMathMode.restype = c_int
    lib.cublasSetMathMode.argtypes = [c_void_p, c_int]
    cuda.current_context()  # cuBLAS binds to the current (primary) context: make Numba's current
    handle = c_void_p()
    status = lib.cublasCreate_v2(ctypes.byref(handle))
    if status != 0:
        raise RuntimeError(f"cublasCreate_v2 failed with status {status}")
    return lib, handle


def _set_math_mode():
    status = _lib.cublasSetMathMode(_handle, _TF32_TENSOR_OP_MATH if _tf32 else _DEFAULT_MATH)
    if status != 0:
        raise RuntimeError(f"cublasSetMathMode failed with status {status}")


def set_tf32(enabled: bool) -> None:
    """Let float32 GEMMs use TF32 tensor cores (default off: full float32, as on the CPU)."""
    global _tf32
    _tf32 = bool(enabled)
    if _handle is not None:
        _set_math_mode()


def available() -> bool:
    """True when GEMMs can go to cuBLAS (loads it on first call; False when it cannot load)."""
    try:
        _load()
        return True
    except RuntimeError:
        return False


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
    _load()
    if A.dtype == np.uint16:  # bf16 bits, checked by matmul.gemm: B is bf16 too and C float32
        status = _lib.cublasGemmEx(_handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, N, M, K,
                                   ctypes.byref(ctypes.c_float(alpha)), _ptr(B), _R_16BF, _ld(B),
                                   _ptr(A), _R_16BF, _ld(A), ctypes.byref(ctypes.c_float(beta)),
                                   _ptr(C), _R_32F, _ld(C), _COMPUTE_32F, _GEMM_DEFAULT)
        if status != 0:
            raise RuntimeError(f"cuBLAS gemm_ex (bf16) failed with status {status} (M={M}, N={N}, K={K})")
        return
    single = C.dtype == np.float32
    real = ctypes.c_float if single else ctypes.c_double
    fn = _lib.cublasSgemm_v2 if single else _lib.cublasDgemm_v2
    status = fn(_handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, N, M, K,
                ctypes.byref(real(alpha)), _ptr(B), _ld(B), _ptr(A), _ld(A),
                ctypes.byref(real(beta)), _ptr(C), _ld(C))
    if status != 0:
        raise RuntimeError(f"cuBLAS gemm failed with status {status} (M={M}, N={N}, K={K})")
