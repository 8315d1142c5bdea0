"""Every CUDA kernel against its CPU twin, forward and backward, on tiny shapes.

Both backends get the same inputs; every argument a kernel writes is compared afterwards.
Outputs start as random values (a forward must overwrite them) and grads start random
(a backward must accumulate into them). Float buffers go to the device; int32 ids and
targets stay NumPy arrays, as nt.ops passes them.
"""
import numpy as np
import pytest

import nt

cpu = nt.backend("cpu")
gpu = nt.backend("cuda")

DTYPES = [np.float64, np.float32]
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}


def randn(rng, dtype, *shape):
    return rng.standard_normal(shape).astype(dtype)


def empty(dtype, *shape):
    return np.zeros(shape, dtype=dtype)


def parity(name, args, written, dtype):
    """Run kernel `name` on both backends; compare the args at indices `written` and the
    return values."""
    host = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    dev = [gpu.to_device(a) if isinstance(a, np.ndarray) and a.dtype != np.int32 else a for a in args]
    want = getattr(cpu, name)(*host)
    got = getattr(gpu, name)(*dev)
    for i in written:
        np.testing.assert_allclose(gpu.to_host(dev[i]), host[i], **TOL[dtype], err_msg=f"{name}: argument {i}")
    if want is not None:
        np.testing.assert_allclose(got, want, **TOL[dtype], err_msg=f"{name}: return value")


# Inference-only kernels with no CUDA twin yet: packed ternary (BitNet) decoding runs on the
# CPU, and nt.bitnet.linear_t2 refuses other backends with a clear error.
CPU_ONLY = {"act_quant_int8", "matmul_t2", "pack_t2", "unpack_t2", "pack_tq2_0", "dequantize_tq2_0"}


def test_backend_has_every_cpu_kernel():
    public = {n for n in dir(cpu) if not n.startswith("_") and callable(getattr(cpu, n))} - CPU_ONLY
    assert public <= set(dir(gpu)), f"missing on cuda: {sorted(public - set(dir(gpu)))}"
    assert gpu.DEVICE == "cuda" and nt.backend("cuda") is gpu
    gpu.synchronize()  # the profiler calls it around every timed kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias, transposed", [(True, False), (False, False), (True, True)])
def test_matmul(dtype, bias, transposed):
    rng = np.random.default_rng(0)
    N, C, OC = 5, 7, 6
    wshape = (C, OC) if transposed else (OC, C)  # transposed: a tied embedding used as (C, OC)
    inp, weight = randn(rng, dtype, N, C), randn(rng, dtype, *wshape)
    b = randn(rng, dtype, OC) if bias else empty(dtype, 0)
    parity("matmul_forward", [randn(rng, dtype, N, OC), inp, weight, b, transposed], [0], dtype)
    parity("matmul_backward", [randn(rng, dtype, N, C), randn(rng, dtype, *wshape), randn(rng, dtype, OC) if bias
                               else empty(dtype, 0), randn(rng, dtype, N, OC), inp, weight, transposed],
           [0, 1, 2], dtype)


def test_missing_cublas_is_a_clear_error(monkeypatch):
    """On a GPU, matmuls need cuBLAS: when it cannot load, every GEMM raises the cause and
    the fix (the simulator uses the tiled kernel instead, so this patches the loader)."""
    from nt.kernels.cuda import cublas

    def no_library():
        raise OSError("libcublas not found")
    monkeypatch.setattr(cublas, "_open", no_library)
    monkeypatch.setattr(cublas, "_handle", None)
    monkeypatch.setattr(cublas, "_error", None)
    assert not cublas.available()
    with pytest.raises(RuntimeError, match=r"cuBLAS is required.*libcublas not found.*nt\[cuda\]"):
        cublas.gemm(False, False, 2, 2, 2, 1.0, None, None, 0.0, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(dtype, bias):
    rng = np.random.default_rng(1)
    N, C = 3, 40  # C > threads per simulated block: each thread strides over channels
    inp, weight = randn(rng, dtype, N, C), randn(rng, dtype, C)
    b = randn(rng, dtype, C) if bias else empty(dtype, 0)
    mean, rstd = randn(rng, dtype, N), randn(rng, dtype, N)
    parity("layernorm_forward", [randn(rng, dtype, N, C), mean, rstd, inp, weight, b, 1e-5], [0, 1, 2], dtype)
    cpu.layernorm_forward(randn(rng, dtype, N, C), mean, rstd, inp, weight, b, 1e-5)  # real statistics
    parity("layernorm_backward", [randn(rng, dtype, N, C), randn(rng, dtype, C), randn(rng, dtype, C) if bias
                                  else empty(dtype, 0), randn(rng, dtype, N, C), inp, weight, mean, rstd],
           [0, 1, 2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_residual_layernorm(dtype, bias, residual):
    rng = np.random.default_rng(11)
    N, C = 3, 40
    rows = N if residual else 0  # an empty residual: the plain layernorm (as the CPU kernel takes it)
    h, x, weight = randn(rng, dtype, N, C), randn(rng, dtype, rows, C), randn(rng, dtype, C)
    b = randn(rng, dtype, C) if bias else empty(dtype, 0)
    mean, rstd = randn(rng, dtype, N), randn(rng, dtype, N)
    parity("residual_layernorm_forward", [randn(rng, dtype, N, C), mean, rstd, h.copy(), x, weight, b, 1e-5],
           [0, 1, 2, 3], dtype)
    cpu.residual_layernorm_forward(randn(rng, dtype, N, C), mean, rstd, h, x, weight, b, 1e-5)  # h: the sum
    parity("residual_layernorm_backward", [randn(rng, dtype, N, C), randn(rng, dtype, rows, C), randn(rng, dtype, C),
                                           randn(rng, dtype, C) if bias else empty(dtype, 0), randn(rng, dtype, N, C),
                                           h, weight, mean, rstd], [0, 1, 2, 3], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bias_act(dtype, bias):
    rng = np.random.default_rng(12)
    N, C = 3, 40
    pre = randn(rng, dtype, N, C)
    b = randn(rng, dtype, C) if bias else empty(dtype, 0)
    for kind in (cpu.GELU_TANH, cpu.SILU):
        parity("bias_act_forward", [randn(rng, dtype, N, C), pre.copy(), b, kind], [0, 1], dtype)
        parity("bias_act_backward", [empty(dtype, N, C), randn(rng, dtype, N, C), pre, kind], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(dtype):
    rng = np.random.default_rng(2)
    n, N, H = 150, 3, 7
    x = 3 * randn(rng, dtype, n)
    parity("gelu_forward", [randn(rng, dtype, n), x], [0], dtype)
    parity("gelu_backward", [randn(rng, dtype, n), randn(rng, dtype, n), x], [0], dtype)
    gate_up = 3 * randn(rng, dtype, N, 2 * H)
    for kind in (cpu.GELU_TANH, cpu.GELU, cpu.SILU, cpu.SIGMOID):
        assert getattr(gpu, ["GELU_TANH", "GELU", "SILU", "SIGMOID"][kind]) == kind
        parity("act_forward", [randn(rng, dtype, n), x, kind], [0], dtype)
        parity("act_backward", [randn(rng, dtype, n), randn(rng, dtype, n), x, kind], [0], dtype)
        parity("glu_forward", [randn(rng, dtype, N, H), gate_up, kind], [0], dtype)
        parity("glu_backward", [randn(rng, dtype, N, 2 * H), randn(rng, dtype, N, H), gate_up, kind], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise(dtype):
    rng = np.random.default_rng(7)
    n, N, Ca, Cb = 150, 3, 4, 5
    a, b = randn(rng, dtype, n), randn(rng, dtype, n)
    parity("add_forward", [randn(rng, dtype, n), a, b], [0], dtype)
    parity("add_backward", [randn(rng, dtype, n), randn(rng, dtype, n), randn(rng, dtype, n)], [0, 1], dtype)
    parity("mul_forward", [randn(rng, dtype, n), a, b], [0], dtype)
    parity("mul_backward", [randn(rng, dtype, n), randn(rng, dtype, n), randn(rng, dtype, n), a, b], [0, 1], dtype)
    s = np.array([0.7], dtype)
    parity("scale_forward", [randn(rng, dtype, n), a, s], [0], dtype)
    for ds in (randn(rng, dtype, 1), empty(dtype, 0)):  # a learned scale, a constant one
        parity("scale_backward", [randn(rng, dtype, n), ds, randn(rng, dtype, n), a, s], [0, 1], dtype)
    parity("concat_forward", [randn(rng, dtype, N, Ca + Cb), randn(rng, dtype, N, Ca), randn(rng, dtype, N, Cb)],
           [0], dtype)
    parity("concat_backward", [randn(rng, dtype, N, Ca), randn(rng, dtype, N, Cb), randn(rng, dtype, N, Ca + Cb)],
           [0, 1], dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the simulator hashes in NumPy uint64
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_same_mask_as_cpu(dtype):
    rng = np.random.default_rng(8)
    n, key = 200, np.uint64(0x1234_5678_9ABC_DEF0)
    parity("dropout_forward", [randn(rng, dtype, n), randn(rng, dtype, n), 0.3, key], [0], dtype)
    parity("dropout_backward", [randn(rng, dtype, n), randn(rng, dtype, n), 0.3, key], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_qk_norm(dtype):
    rng = np.random.default_rng(9)
    N, C = 3, 20
    inp, w, rstd = randn(rng, dtype, N, C), randn(rng, dtype, C), randn(rng, dtype, N)
    parity("rmsnorm_forward", [randn(rng, dtype, N, C), rstd, inp, w, 1e-6], [0, 1], dtype)
    cpu.rmsnorm_forward(randn(rng, dtype, N, C), rstd, inp, w, 1e-6)
    parity("rmsnorm_backward", [randn(rng, dtype, N, C), randn(rng, dtype, C), randn(rng, dtype, N, C), inp, w, rstd,
                                randn(rng, dtype, N, C)], [0, 1], dtype)   # the last: scratch
    B, T, NH, NKV, hs = 2, 3, 2, 1, 4
    W = (NH + 2 * NKV) * hs
    qkv, qw, kw, rs = randn(rng, dtype, B, T, W), randn(rng, dtype, hs), randn(rng, dtype, hs), randn(rng, dtype, B, T, NH + NKV)
    parity("qk_norm_forward", [randn(rng, dtype, B, T, W), rs, qkv, qw, kw, NH, NKV, 1e-6], [0, 1], dtype)
    cpu.qk_norm_forward(randn(rng, dtype, B, T, W), rs, qkv, qw, kw, NH, NKV, 1e-6)
    parity("qk_norm_backward", [randn(rng, dtype, B, T, W), randn(rng, dtype, hs), randn(rng, dtype, hs),
                                randn(rng, dtype, B, T, W), qkv, qw, kw, rs, NH, NKV], [0, 1, 2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("half", [False, True])
def test_rope(dtype, half):
    rng = np.random.default_rng(10)
    B, T, NH, NKV, hs, pos0 = 2, 3, 2, 1, 4, 5
    W = (NH + 2 * NKV) * hs
    angles = np.outer(np.arange(pos0, pos0 + T), 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs))
    cs = np.concatenate([np.cos(angles), np.sin(angles)], 1)  # float64 (T, hs), as ops.rope passes it
    parity("rope_forward", [randn(rng, dtype, B, T, W), NH, NKV, cs, half], [0], dtype)
    parity("rope_backward", [randn(rng, dtype, B, T, W), randn(rng, dtype, B, T, W), NH, NKV, cs, half],
           [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype):
    rng = np.random.default_rng(11)
    N, C = 3, 19
    out = randn(rng, dtype, N, C)
    parity("softmax_forward", [out, 3 * randn(rng, dtype, N, C)], [0], dtype)
    cpu.softmax_forward(out, randn(rng, dtype, N, C))
    parity("softmax_backward", [randn(rng, dtype, N, C), randn(rng, dtype, N, C), out], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions", [True, False])
def test_embedding(dtype, positions):
    rng = np.random.default_rng(3)
    B, T, C, V, maxT, pos0 = 2, 4, 5, 6, 7, 2
    ids = np.array([[1, 3, 1, 1], [5, 1, 0, 3]], dtype=np.int32)  # repeated ids: racing writers
    wte = randn(rng, dtype, V, C)
    wpe = randn(rng, dtype, maxT, C) if positions else empty(dtype, 0, C)
    parity("embedding_forward", [randn(rng, dtype, B, T, C), ids, wte, wpe, pos0], [0], dtype)
    dwpe = randn(rng, dtype, maxT, C) if positions else empty(dtype, 0, C)
    parity("embedding_backward", [randn(rng, dtype, V, C), dwpe, randn(rng, dtype, B, T, C), ids, pos0],
           [0, 1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("NH, NKV, window, q0, T", [(2, 2, 0, 0, 4), (4, 2, 0, 0, 4), (4, 1, 2, 0, 4), (2, 1, 0, 2, 4),
                                                    # past one block of rows and one key tile
                                                    (4, 2, 5, 0, 21), (2, 1, 0, 13, 21), (2, 2, 7, 9, 21)])
def test_attention(dtype, NH, NKV, window, q0, T):
    rng = np.random.default_rng(4)
    B, hs = 2, 3  # q0 > 0: rows before q0 are a KV cache, only T - q0 queries
    qkv = randn(rng, dtype, B, T, (NH + 2 * NKV) * hs)
    out, lse = randn(rng, dtype, B, T - q0, NH * hs), randn(rng, dtype, B, NH, T - q0)
    work = randn(rng, dtype, *cpu.attention_work_shape(T))  # CPU scratch; the GPU needs none
    parity("attention_forward", [out, lse, qkv, work, NH, NKV, window, q0], [0, 1], dtype)
    cpu.attention_forward(out, lse, qkv, work, NH, NKV, window, q0)  # what the backward reads
    parity("attention_backward", [randn(rng, dtype, *qkv.shape), randn(rng, dtype, *out.shape), qkv, out, lse,
                                  work, NH, NKV, window, q0], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("targets, opts", [([3, -1, 0, 9, 3], (0.0, 0.0)), ([3, -1, 0, 9, 3], (0.1, 1e-3)),
                                           ([-1, -1, -1, -1, -1], (0.0, 0.0))])
def test_softmax_xent(dtype, targets, opts):
    rng = np.random.default_rng(5)
    N, V, Vp = 5, 10, 48  # padded columns V..Vp-1 take no part; Vp > simulated block
    targets = np.array(targets, dtype=np.int32)
    logits = 4 * randn(rng, dtype, N, Vp)
    loss, losses, lse = randn(rng, dtype, 1), randn(rng, dtype, N), randn(rng, dtype, N)
    parity("softmax_xent_forward", [loss, losses, lse, logits, targets, V, *opts], [0, 1, 2], dtype)
    cpu.softmax_xent_forward(loss, losses, lse, logits, targets, V, *opts)
    parity("softmax_xent_backward", [randn(rng, dtype, N, Vp), np.array([0.7], dtype), logits, lse, targets, V,
                                     *opts], [0], dtype)
    parity("softmax_xent_grad_", [logits.copy(), np.array([0.7], dtype), lse, targets, V, *opts], [0], dtype)
    # the chunked classifier's rows (a frozen classifier in training): loss per row, gradient in place
    parity("xent_rows_grad_", [logits.copy(), randn(rng, dtype, N), targets, V, 0.25, *opts], [0, 1], dtype)
    parity("xent_mean", [randn(rng, dtype, 1), losses, targets], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_optim_kernels(dtype):
    rng = np.random.default_rng(6)
    n = 300  # more than one simulated grid's worth of threads: exercises grid-stride loops
    x = randn(rng, dtype, n)  # each backend sizes its own partials buffer
    got = gpu.sum_squares(gpu.to_device(x), gpu.empty(gpu.sum_squares_blocks(n), np.float64))
    np.testing.assert_allclose(got, cpu.sum_squares(x, np.empty(cpu.sum_squares_blocks(n))), rtol=1e-12)
    parity("scale_", [randn(rng, dtype, n), 0.37], [0], dtype)
    parity("fill_", [randn(rng, dtype, n), 2.5], [0], dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the simulator hashes in NumPy uint64
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_table_optimizer_kernels(dtype):
    rng = np.random.default_rng(12)
    n = 300
    bo = np.array([0, 64, 100, 170, 234, 300], np.int64)  # 5 blocks over 3 tensors
    bs = np.array([0, 0, 1, 2, 2], np.int64)
    decay = np.array([1, 0, 1, 1, 0], np.uint8)  # one weight-decay flag per block
    for zero_grads in (False, True):
        parity("adam_update", [randn(rng, dtype, n), randn(rng, dtype, n), randn(rng, dtype, n),
                               np.abs(randn(rng, dtype, n)), bo, bs, decay, np.array([1.0, 0.0, 0.5]),
                               np.array([3, 1, 7], np.int64), 1e-2, 0.9, 0.95, 1e-8, 0.01, 0.1, np.array([0.7]),
                               zero_grads], [0, 1, 2, 3], dtype)
    for first, nesterov, momentum in [(True, False, 0.9), (False, True, 0.9), (False, False, 0.0)]:
        parity("sgd_update", [randn(rng, dtype, n), randn(rng, dtype, n), randn(rng, dtype, n), bo, decay,
                              0.1, momentum, 0.1, 0.01, nesterov, first, np.array([0.7])], [0, 2], dtype)
    parity("segment_sum_squares", [randn(rng, dtype, n), bo, bs, np.zeros(5), np.zeros(3)], [4], dtype)
    x = randn(rng, dtype, n)
    x[3], x[7] = np.inf, -np.inf
    # each backend sizes its own per-block partials
    dev_x = gpu.to_device(x)
    got = gpu.unscale_check_(dev_x, 0.5, gpu.empty(gpu.sum_squares_blocks(n), np.float64))
    want = cpu.unscale_check_(x, 0.5, np.empty(cpu.sum_squares_blocks(n)))
    assert got == want == 2
    np.testing.assert_allclose(gpu.to_host(dev_x), x, **TOL[dtype])
    parity("add_noise_", [randn(rng, dtype, n), bo, bs, np.array([0.1, 0.0, 2.0]), 7, 3], [0], dtype)


def test_memory_round_trip_and_views():
    x = gpu.empty(40, np.float32)
    gpu.fill_(x, 0.0)
    gpu.copy_(x[16:28], np.arange(12, dtype=np.float32))          # host -> device view
    view = x[16:28].reshape(3, 4)                                  # how Tensor.data slices arenas
    np.testing.assert_array_equal(gpu.to_host(view), np.arange(12).reshape(3, 4))
    y = gpu.empty(12, np.float32)
    gpu.copy_(y, x[16:28])                                         # device -> device
    np.testing.assert_array_equal(gpu.to_host(y), np.arange(12))
    assert gpu.to_host(x)[:16].sum() == 0 and gpu.to_host(x)[28:].sum() == 0


def test_ids_buffer_is_reused_and_refreshed():
    a = np.array([[1, 2], [3, 4]], dtype=np.int32)
    first = gpu.ids_to_device(a)
    second = gpu.ids_to_device(a[::-1].copy())
    assert first is second  # one buffer per shape: no allocation per step
    np.testing.assert_array_equal(gpu.to_host(second), a[::-1])


def test_uploads_go_through_staging_in_turn():
    """copy_ from the host stages through pinned buffers used in turn: a burst of uploads
    larger than the ring lands intact (each buffer is rewritten only after its copy)."""
    from nt.kernels.cuda import memory
    arrays = [np.arange(i, i + 7, dtype=np.float32) for i in range(2 * len(memory._STAGING) + 1)]
    dev = [gpu.empty(7, np.float32) for _ in arrays]
    for d, a in zip(dev, arrays):
        gpu.copy_(d, a)
        a[:] = -1  # the caller may reuse its array at once
    for i, d in enumerate(dev):
        np.testing.assert_array_equal(gpu.to_host(d), np.arange(i, i + 7, dtype=np.float32))
    big = np.arange(memory._STAGE_BYTES // 4 + 1, dtype=np.float32)  # weights: copied directly
    d = gpu.empty(big.size, np.float32)
    gpu.copy_(d, big)
    np.testing.assert_array_equal(gpu.to_host(d), big)
    assert all(stage.buf.nbytes <= memory._STAGE_BYTES for stage in memory._STAGING)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora(dtype):
    """The adapter's gemms write column blocks of the output (strided views) on both backends:
    one adapter, and a group of two stacked adapters (parts = (first column, rows) each)."""
    rng = np.random.default_rng(11)
    N, C, OC, r, OCp, o0 = 5, 6, 9, 2, 4, 3
    one = np.array([[o0, OCp]], np.int64)
    xa, A, B = randn(rng, dtype, N, C), randn(rng, dtype, r, C), randn(rng, dtype, OCp, r)
    out, h = randn(rng, dtype, N, OC), empty(dtype, N, r)
    parity("lora_forward", [out, h, xa, A, B, 0.7, one], [0, 1], dtype)
    dout, dh = randn(rng, dtype, N, OC), empty(dtype, N, r)
    dxa, dA, dB = randn(rng, dtype, N, C), randn(rng, dtype, r, C), randn(rng, dtype, OCp, r)
    h = xa @ A.T
    parity("lora_backward", [dxa, dA, dB, dh, dout, h, xa, A, B, 0.7, one], [0, 1, 2, 3], dtype)
    frozen = empty(dtype, 0, C), empty(dtype, 0, r)  # adapters frozen (a reference pass): dA, dB skipped
    parity("lora_backward", [dxa, frozen[0], frozen[1], dh, dout, h, xa, A, B, 0.7, one], [0, 3], dtype)
    parts = np.array([[0, 3], [5, 4]], np.int64)                      # a group of two: OC = 9, r = 2
    A2, B2, h2 = randn(rng, dtype, 2 * r, C), randn(rng, dtype, 7, r), empty(dtype, N, 2 * r)
    parity("lora_forward", [out, h2, xa, A2, B2, 0.7, parts], [0, 1], dtype)
    parity("lora_backward", [dxa, randn(rng, dtype, 2 * r, C), randn(rng, dtype, 7, r), empty(dtype, N, 2 * r), dout,
                             xa @ A2.T, xa, A2, B2, 0.7, parts], [0, 1, 2, 3], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_kl_and_row_sums(dtype):
    rng = np.random.default_rng(12)
    N, Vp, V, Vt = 6, 9, 7, 8
    logits, teacher = randn(rng, dtype, N, Vp), randn(rng, dtype, N, Vt)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[2] = -1
    parity("logprobs_forward", [empty(dtype, N), empty(dtype, N), logits, targets, V], [0, 1], dtype)
    lse = np.log(np.exp(logits[:, :V].astype(np.float64)).sum(1)).astype(dtype)
    parity("logprobs_backward", [randn(rng, dtype, N, Vp), randn(rng, dtype, N), logits, lse, targets, V], [0], dtype)
    for T in (1.0, 2.0):
        parity("kl_div_forward", [empty(dtype, 1), empty(dtype, N), empty(dtype, N, 2), logits, teacher, targets, V, T],
               [0, 1, 2], dtype)
        lse2 = np.stack([np.log(np.exp(z[:, :V].astype(np.float64) / T).sum(1)) for z in (logits, teacher)], 1)
        parity("kl_div_backward", [randn(rng, dtype, N, Vp), np.array([0.7], dtype), logits, teacher,
                                   lse2.astype(dtype), targets, V, T], [0], dtype)
    x = randn(rng, dtype, 5, 7)
    parity("sum_rows_forward", [empty(dtype, 5), x], [0], dtype)
    parity("sum_rows_backward", [randn(rng, dtype, 5, 7), randn(rng, dtype, 5)], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, smoothing", [(0, 0.0), (0, 0.2), (1, 0.0)])
def test_dpo(dtype, kind, smoothing):
    rng = np.random.default_rng(13)
    B = 11   # more pairs than simulated threads: each thread strides over pairs
    policy, ref = randn(rng, dtype, 2 * B) * 5, randn(rng, dtype, 2 * B) * 5
    weight = rng.uniform(0.1, 1.0, 2 * B).astype(dtype)
    parity("dpo_forward", [empty(dtype, 1), empty(dtype, B), policy, ref, weight, 0.3, smoothing, kind], [0, 1], dtype)
    parity("dpo_backward", [randn(rng, dtype, 2 * B), np.array([0.7], dtype), policy, ref, weight, 0.3, smoothing,
                            kind], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta, eps_low, eps_high", [(0.0, 0.2, 0.2), (0.1, 0.2, 0.28)])
def test_grpo(dtype, beta, eps_low, eps_high):
    rng = np.random.default_rng(14)
    B, T = 5, 11
    lp = randn(rng, dtype, B, T) - 2
    old = lp + (0.3 * randn(rng, dtype, B, T)).astype(dtype)
    ref = lp + (0.5 * randn(rng, dtype, B, T)).astype(dtype)
    adv = randn(rng, dtype, B)
    mask = (rng.random((B, T)) < 0.7).astype(dtype)
    args = [lp, old, ref, adv, mask, beta, eps_low, eps_high]
    parity("grpo_forward", [empty(dtype, 1), empty(dtype, B)] + args, [0, 1], dtype)
    parity("grpo_backward", [randn(rng, dtype, B, T), np.array([0.7], dtype)] + args, [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("NH, NKV, q0, T", [(2, 2, 0, 4), (4, 1, 0, 5), (2, 1, 3, 5),
                                            (2, 1, 0, 11)])  # past one block of rows and one key tile
def test_attention_noncausal(dtype, NH, NKV, q0, T):
    """causal=False: every query row sees every key, before and after it."""
    rng = np.random.default_rng(40)
    B, hs = 2, 3
    qkv = randn(rng, dtype, B, T, (NH + 2 * NKV) * hs)
    out, lse = randn(rng, dtype, B, T - q0, NH * hs), randn(rng, dtype, B, NH, T - q0)
    work = randn(rng, dtype, *cpu.attention_work_shape(T))
    parity("attention_forward", [out, lse, qkv, work, NH, NKV, 0, q0, False], [0, 1], dtype)
    cpu.attention_forward(out, lse, qkv, work, NH, NKV, 0, q0, False)
    parity("attention_backward", [randn(rng, dtype, *qkv.shape), randn(rng, dtype, *out.shape), qkv, out, lse,
                                  work, NH, NKV, 0, q0, False], [0], dtype)


# ----------------------------------------------------------------------------- vision and Hebbian kernels

@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_ops(dtype):
    """Patch unfolding, CLS token + positions, mean and CLS pooling; forward and backward."""
    rng = np.random.default_rng(41)
    N, Ch, H, W, p, C = 2, 2, 4, 2, 2, 3
    P, K = (H // p) * (W // p), Ch * p * p
    x = randn(rng, dtype, N, Ch, H, W)
    parity("unfold_forward", [randn(rng, dtype, N, P, K), x, p], [0], dtype)
    parity("unfold_backward", [randn(rng, dtype, N, Ch, H, W), randn(rng, dtype, N, P, K), p], [0], dtype)
    tokens, cls, pos = randn(rng, dtype, N, P, C), randn(rng, dtype, C), randn(rng, dtype, P + 1, C)
    parity("cls_pos_forward", [randn(rng, dtype, N, P + 1, C), tokens, cls, pos], [0], dtype)
    for dcls, dpos in ((randn(rng, dtype, C), randn(rng, dtype, P + 1, C)), (empty(dtype, 0), empty(dtype, 0, C))):
        parity("cls_pos_backward", [randn(rng, dtype, N, P, C), dcls, dpos, randn(rng, dtype, N, P + 1, C)],
               [0, 1, 2], dtype)
    for mean in (True, False):
        parity("pool_forward", [randn(rng, dtype, N, C), randn(rng, dtype, N, P + 1, C), mean], [0], dtype)
        parity("pool_backward", [randn(rng, dtype, N, P + 1, C), randn(rng, dtype, N, C), mean], [0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("oja", [False, True])
def test_hebbian_update(dtype, oja):
    rng = np.random.default_rng(42)
    N, C, OC = 3, 5, 4
    parity("hebbian_update", [randn(rng, dtype, OC, C), randn(rng, dtype, N, C), randn(rng, dtype, N, OC), 0.1,
                              0.3, oja], [0], dtype)


@pytest.mark.parametrize("kind", [np.uint8, np.float32])
def test_image_transforms(kind):
    """Resize (up and down), crop with padding and flips, grayscale, normalise to CHW."""
    rng = np.random.default_rng(43)
    img = (rng.random((2, 5, 4, 3)) * 255).astype(kind)
    rounding = 0.5 if kind == np.uint8 else 0.0
    for OH, OW in ((7, 3), (2, 6)):
        parity("resize_bilinear", [np.zeros((2, OH, OW, 3), kind), img, rounding], [0], np.float32)
    boxes = np.array([[1, -1, 0], [0, 2, 1]], dtype=np.int32)   # the second window leaves the image: fill
    parity("crop_flip", [np.zeros((2, 3, 3, 3), kind), img, boxes, 7], [0], np.float32)
    parity("grayscale", [np.zeros((2, 5, 4, 1), kind), img, rounding], [0], np.float32)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    parity("to_chw", [np.zeros((2, 3, 5, 4), np.float32), img, 1 / 255, mean, std], [0], np.float32)


def test_vision_and_hebbian_api_on_cuda():
    """nt.vision's transforms and nt.hebbian.update run on the CUDA backend through the
    same Python API (device="cuda") and agree with the CPU."""
    from nt import hebbian, vision
    rng = np.random.default_rng(44)
    img = (rng.random((2, 5, 4, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(vision.resize(img, (3, 6), device="cuda"), vision.resize(img, (3, 6)))
    np.testing.assert_array_equal(vision.center_crop(img, 3, device="cuda"), vision.center_crop(img, 3))
    np.testing.assert_allclose(vision.to_chw(img, 0.5, 0.2, device="cuda"), vision.to_chw(img, 0.5, 0.2), rtol=1e-6)
    w, x, y = randn(rng, np.float64, 3, 4), randn(rng, np.float64, 2, 4), randn(rng, np.float64, 2, 3)
    on_gpu = gpu.to_device(w)
    hebbian.update(on_gpu, gpu.to_device(x), gpu.to_device(y), 0.1, "oja", device="cuda")
    hebbian.update(w, x, y, 0.1, "oja")
    np.testing.assert_allclose(gpu.to_host(on_gpu), w, rtol=1e-12)


def test_vit_step_matches_cpu():
    """A tiny ViT (patches, CLS + positions, bidirectional attention, CLS pooling) gives the
    same loss and parameter grads on the CUDA backend as on the CPU, in float64."""
    from nt.models import ViT, ViTConfig
    cfg = ViTConfig(image_size=4, patch=2, channels=1, width=4, depth=1, heads=2, classes=3, mlp=1)
    rng = np.random.default_rng(45)
    x, y = rng.standard_normal((2, 1, 4, 4)), np.array([2, 0])
    results = []
    for device in ("cpu", "cuda"):
        model = ViT(cfg, device=device, dtype=np.float64, seed=3)
        _, loss = model(x, y)
        model.zero_grad()
        model.backward()
        results.append((loss, np.array(model.params.k.to_host(model.params.grad))))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-10)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("op", ["dpo", "ipo", "grpo"])
def test_alignment_ops_on_the_tape(op):
    """ops.dpo / ops.grpo on a CUDA tape (their NumPy inputs copied into device memory) give
    the CPU tape's loss and gradient."""
    from helpers import make_params
    rng = np.random.default_rng(15)
    B, T = 3, 5
    lp = rng.normal(-2, 1, (B, T))
    old, ref = lp + rng.normal(0, 0.3, (B, T)), lp + rng.normal(0, 0.5, (B, T))
    adv, mask = rng.standard_normal(B), (rng.random((B, T)) < 0.7).astype(np.float64)
    pi, ref_seq, lengths = rng.normal(-20, 4, 2 * B), rng.normal(-20, 4, 2 * B), rng.integers(1, 9, 2 * B)
    results = []
    for device in ("cpu", "cuda"):
        t = nt.Tape(device, np.float64)
        if op == "grpo":
            params = make_params({"x": lp}, device=device)
            loss = nt.ops.grpo(t, params["x"], old, ref, adv, mask, 0.1, 0.2, 0.28)
        else:
            params = make_params({"x": pi}, device=device)
            loss = nt.ops.dpo(t, params["x"], ref_seq, 0.3, 0.1, "sigmoid" if op == "dpo" else op,
                              lengths if op == "ipo" else None)
        params.zero_grad()
        t.backward(loss)
        results.append((t.k.to_host(loss.data).copy(), t.k.to_host(params["x"].grad).copy()))
    for want, got in zip(*results):
        np.testing.assert_allclose(got, want, **TOL[np.float64])
