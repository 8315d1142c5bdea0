"""Checks that only mean something on a real GPU: cuBLAS, and the kernels at the launch
configurations they use there (256-thread blocks). Skipped under the simulator; run them
on a GPU machine with `NUMBA_ENABLE_CUDASIM=0 pytest tests/cuda`."""
import numpy as np
import pytest

import nt
from test_kernels import cpu, parity, randn

pytestmark = pytest.mark.gpu
gpu = nt.backend("cuda")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_cublas_matches_tiled_kernel(dtype, trans_a, trans_b, beta):
    from nt.kernels.cuda import cublas, matmul
    assert cublas.available(), "cuBLAS did not load: pip install 'nt[cuda]'"
    rng = np.random.default_rng(0)
    M, N, K = 67, 129, 33  # not multiples of the tile size
    A = randn(rng, dtype, *((K, M) if trans_a else (M, K)))
    B = randn(rng, dtype, *((N, K) if trans_b else (K, N)))
    C0 = randn(rng, dtype, M, N)
    dA, dB = gpu.to_device(A), gpu.to_device(B)
    c_blas, c_kernel = gpu.to_device(C0), gpu.to_device(C0)
    cublas.gemm(trans_a, trans_b, M, N, K, 1.0, dA, dB, beta, c_blas)
    matmul.gemm_tiled(trans_a, trans_b, dA, dB, beta, c_kernel)
    want = (A.T if trans_a else A).astype(np.float64) @ (B.T if trans_b else B) + beta * C0
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gpu.to_host(c_blas), want, **tol)
    np.testing.assert_allclose(gpu.to_host(c_kernel), want, **tol)


def test_cublas_tf32_is_an_explicit_option():
    """TF32 (10-bit mantissa products) only when asked for: off, float32 GEMMs match a
    float64 product to float32 rounding; on, to TF32's ~1e-3; then off again."""
    from nt.kernels.cuda import cublas
    rng = np.random.default_rng(2)
    M = N = K = 256
    A, B = randn(rng, np.float32, M, K), randn(rng, np.float32, K, N)
    want = A.astype(np.float64) @ B
    dA, dB, dC = gpu.to_device(A), gpu.to_device(B), gpu.empty(M * N, np.float32).reshape(M, N)
    errors = []
    for tf32 in (False, True, False):
        cublas.set_tf32(tf32)
        cublas.gemm(False, False, M, N, K, 1.0, dA, dB, 0.0, dC)
        errors.append(np.abs(gpu.to_host(dC) - want).max() / np.abs(want).max())
    assert errors[0] < 1e-5 and errors[2] < 1e-5 and 1e-5 < errors[1] < 1e-2, errors


def test_kernels_at_gpu_sizes():
    rng = np.random.default_rng(1)
    dtype = np.float32
    N, C, OC, V, Vp = 96, 768, 300, 1000, 1024
    inp, w = randn(rng, dtype, N, C), randn(rng, dtype, C)
    parity("matmul_forward", [randn(rng, dtype, N, OC), inp, randn(rng, dtype, OC, C), randn(rng, dtype, OC)],
           [0], dtype)
    mean, rstd = randn(rng, dtype, N), randn(rng, dtype, N)
    parity("layernorm_forward", [randn(rng, dtype, N, C), mean, rstd, inp, w, w, 1e-5], [0, 1, 2], dtype)
    cpu.layernorm_forward(randn(rng, dtype, N, C), mean, rstd, inp, w, w, 1e-5)
    # two-stage weight/bias grads with 256-thread blocks: 3 chunks of 32 rows x 3 column tiles
    parity("layernorm_backward", [randn(rng, dtype, N, C), randn(rng, dtype, C), randn(rng, dtype, C),
                                  randn(rng, dtype, N, C), inp, w, mean, rstd], [0, 1, 2], dtype)
    targets = rng.integers(-1, V, N).astype(np.int32)
    parity("softmax_xent_forward", [randn(rng, dtype, 1), randn(rng, dtype, N), randn(rng, dtype, N),
                                    randn(rng, dtype, N, Vp), targets, V], [0, 1, 2], dtype)
    B, T, NH, hs = 2, 64, 4, 16
    qkv = randn(rng, dtype, B, T, 3 * NH * hs)
    parity("attention_forward", [randn(rng, dtype, B, T, NH * hs), randn(rng, dtype, B, NH, T), qkv,
                                 randn(rng, dtype, *cpu.attention_work_shape(T)), NH, NH, 0, 0], [0, 1], dtype)
    x = randn(rng, dtype, 1_000_003)
    got = gpu.sum_squares(gpu.to_device(x), gpu.empty(gpu.sum_squares_blocks(x.size), np.float64))
    np.testing.assert_allclose(got, np.sum(x.astype(np.float64) ** 2), rtol=1e-10)


def _bf16_gemm_check(trans_a, trans_b, M, N, K):
    """matmul.gemm on bf16 operands (cuBLAS gemm_ex on a GPU) against the simulator's
    arithmetic (exactly widened operands on the tiled float32 kernel) and a float64 product
    of the rounded values."""
    from nt.kernels.cuda import bf16, matmul
    from test_mixed_precision import _rounded
    rng = np.random.default_rng(3)
    A = randn(rng, np.float32, *((K, M) if trans_a else (M, K)))
    B = randn(rng, np.float32, *((N, K) if trans_b else (K, N)))
    a16, b16 = bf16.operand(gpu.to_device(A), 0), bf16.operand(gpu.to_device(B), 1)
    got, tiled = gpu.empty(M * N, np.float32).reshape(M, N), gpu.empty(M * N, np.float32).reshape(M, N)
    matmul.gemm(trans_a, trans_b, a16, b16, 0.0, got)
    matmul.gemm_tiled(trans_a, trans_b, bf16.widen(a16, 0), bf16.widen(b16, 1), 0.0, tiled)
    want = (_rounded(A).T if trans_a else _rounded(A)) @ (_rounded(B).T if trans_b else _rounded(B))
    tol = dict(rtol=0, atol=K * 2.0 ** -23 * np.abs(want).max() * 4)   # float32 sums of K exact products
    np.testing.assert_allclose(gpu.to_host(got), want, **tol)
    np.testing.assert_allclose(gpu.to_host(tiled), want, **tol)


@pytest.mark.parametrize("trans_a, trans_b", [(False, True), (False, False), (True, False)])
def test_cublas_bf16_gemm_accumulates_in_float32(trans_a, trans_b):
    """cublasGemmEx with bf16 inputs and COMPUTE_32F at GPT-2 sizes (K = 768, not tile multiples)."""
    from nt.kernels.cuda import cublas
    assert cublas.available(), "cuBLAS did not load: pip install 'nt[cuda]'"
    _bf16_gemm_check(trans_a, trans_b, 200, 136, 768)
