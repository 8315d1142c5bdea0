import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops


def reference(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def build(t, p):
    return ops.layernorm(t, p["x"], p["w"], p["b"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 5])
def test_layernorm_forward_matches_numpy(dtype, T):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, T, 70)) * 3 + 1, rng.standard_normal(70), rng.standard_normal(70)
    _, _, out = run_op(build, {"x": x, "w": w, "b": b}, dtype)
    np.testing.assert_allclose(out.data, reference(x, w, b), rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("shape", [(3, 70), (2, 1, 70)])  # the second: T = 1
def test_layernorm_backward_finite_differences(shape):
    rng = np.random.default_rng(1)
    # C = 70 spans two column blocks of the weight-grad reduction
    check_grads(build, {"x": rng.standard_normal(shape), "w": rng.standard_normal(70),
                        "b": rng.standard_normal(70)})


def test_layernorm_without_bias():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((4, 6)), rng.standard_normal(6)
    _, _, out = run_op(lambda t, p: ops.layernorm(t, p["x"], p["w"]), {"x": x, "w": w})
    np.testing.assert_allclose(out.data, reference(x, w, 0.0), rtol=1e-12, atol=1e-12)
    check_grads(lambda t, p: ops.layernorm(t, p["x"], p["w"]), {"x": x, "w": w})


def test_layernorm_rejects_mismatched_weight():
    _, p, _ = run_op(lambda t, p: p["x"], {"x": np.ones((2, 4)), "w": np.ones(5)})
    with pytest.raises(ValueError, match="features"):
        ops.layernorm(Tape("cpu", np.float64), p["x"], p["w"])


# ----------------------------------------------------------------------------- residual + layernorm

def fused(t, p):
    """A linear's output as h (residual_layernorm_ overwrites it), both results used downstream."""
    s, n = ops.residual_layernorm_(t, ops.linear(t, p["a"], p["wa"]), p["x"], p["w"], p["b"])
    return ops.concat(t, s, n)


def unfused(t, p):
    s = ops.residual_(t, ops.linear(t, p["a"], p["wa"]), p["x"])
    return ops.concat(t, s, ops.layernorm(t, s, p["w"], p["b"]))


def fused_arrays(seed, shape=(2, 3, 70)):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    return {"a": rng.standard_normal(shape[:-1] + (5,)), "wa": rng.standard_normal((C, 5)),
            "x": rng.standard_normal(shape) * 2 + 1, "w": rng.standard_normal(C), "b": rng.standard_normal(C)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_layernorm_forward_matches_numpy(dtype):
    arrays = fused_arrays(4)
    t, p, out = run_op(lambda t, p: ops.residual_layernorm_(t, ops.linear(t, p["a"], p["wa"]), p["x"], p["w"], p["b"]),
                       arrays, dtype)
    s, n = out
    want = arrays["a"] @ arrays["wa"].T + arrays["x"]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.data, want, **tol)
    np.testing.assert_allclose(n.data, reference(want, arrays["w"], arrays["b"]), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_layernorm_equals_residual_then_layernorm_bitwise(dtype):
    """The same bits as the two ops it fuses, forward and every gradient."""
    arrays = fused_arrays(5)
    results = []
    for build in (fused, unfused):
        t, p, out = run_op(build, arrays, dtype)
        p.zero_grad()
        t.backward(out, np.random.default_rng(0).standard_normal(out.shape).astype(dtype))
        results.append((out.data.copy(), p.grad.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("shape", [(3, 70), (2, 1, 6)])
def test_residual_layernorm_backward_finite_differences(shape):
    check_grads(fused, fused_arrays(6, shape))
    arrays = fused_arrays(7, shape)
    del arrays["b"]
    check_grads(lambda t, p: ops.residual_layernorm_(t, ops.linear(t, p["a"], p["wa"]), p["x"], p["w"])[1], arrays)


def test_residual_layernorm_rejects_bad_inputs():
    arrays = {**fused_arrays(8), "wb": np.ones((4, 5)), "w4": np.ones(4)}
    t, p, _ = run_op(lambda t, p: p["x"], arrays)
    h = ops.linear(t, p["a"], p["wa"])
    with pytest.raises(ValueError, match="op output"):
        ops.residual_layernorm_(t, p["x"], h, p["w"], p["b"])
    with pytest.raises(ValueError, match="differ"):
        ops.residual_layernorm_(t, h, ops.linear(t, p["a"], p["wb"]), p["w"], p["b"])
    with pytest.raises(ValueError, match="features"):
        ops.residual_layernorm_(t, h, p["x"], p["w4"], p["b"])
    with pytest.raises(ValueError, match="features"):
        ops.residual_layernorm_(t, h, p["x"], p["w"], p["w4"])


def unfused_gpt2_loss(model, idx, targets, fused_mlp):
    """GPT-2's forward as it was before the fusion: residual_, then layernorm (the MLP's
    linear and GELU fused as the model runs them, or not)."""
    from nt.models.gpt2 import GPT2
    cfg, p, t = model.config, model.params, model.tape
    t.reset()
    x = ops.embedding(t, idx, p["wte"], p["wpe"])
    for l in range(cfg.n_layer):
        h = ops.layernorm(t, x, p["ln1w"][l], p["ln1b"][l])
        h = ops.attention(t, ops.linear(t, h, p["qkvw"][l], p["qkvb"][l]), cfg.n_head)
        x = ops.residual_(t, ops.linear(t, h, p["attprojw"][l], p["attprojb"][l]), x)
        n = ops.layernorm(t, x, p["ln2w"][l], p["ln2b"][l])
        if fused_mlp:
            h = ops.gelu_mlp(t, n, p["fcw"][l], p["fcb"][l], p["fcprojw"][l], p["fcprojb"][l])
        else:
            h = ops.linear(t, ops.gelu(t, ops.linear(t, n, p["fcw"][l], p["fcb"][l])), p["fcprojw"][l], p["fcprojb"][l])
        x = ops.residual_(t, h, x)
    h = ops.layernorm(t, x, p["lnfw"], p["lnfb"])
    assert isinstance(model, GPT2)
    return ops.classifier_xent(t, h, p["wte"], targets, cfg.vocab_size)[1]


@pytest.mark.parametrize("dtype, fused_mlp", [(np.float32, True), (np.float64, True), (np.float64, False)])
def test_gpt2_fused_residual_layernorm_and_gelu_mlp_equal_unfused(dtype, fused_mlp):
    """Bit for bit against residual_ + layernorm; against the fully unfused model (the
    fc matmul adding its bias itself) in float64 to 1e-12."""
    from nt.models import GPT2, GPT2Config
    model = GPT2(GPT2Config(block_size=8, vocab_size=70, n_layer=2, n_head=2, n_embd=16), dtype=dtype, seed=3)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 70, (2, 8)), rng.integers(0, 70, (2, 8))
    results = []
    for run in ("fused", "unfused"):
        model.zero_grad()
        if run == "fused":
            _, loss = model.forward(idx, targets)
        else:
            loss = unfused_gpt2_loss(model, idx, targets, fused_mlp)
        model.tape.backward(loss)
        results.append((loss.numpy().copy(), model.params.grad.copy()))
    if fused_mlp:
        np.testing.assert_array_equal(results[0][0], results[1][0])
        np.testing.assert_array_equal(results[0][1], results[1][1])
    else:
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def test_residual_layernorm_kernels_take_an_empty_residual():
    """The residual kernels with a 0-row residual are the plain layernorm (the plain entry
    points are that call), forward and backward, bit for bit."""
    from nt.kernels import cpu as K
    rng = np.random.default_rng(8)
    N, C = 5, 70
    x, w, b, dy = (rng.standard_normal(s).astype(np.float32) for s in ((N, C), C, C, (N, C)))
    ref = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    got = tuple(np.empty_like(a) for a in ref)
    h = x.copy()
    K.layernorm_forward(*ref, x, w, b, 1e-5)
    K.residual_layernorm_forward(*got, h, h[:0], w, b, 1e-5)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)
    np.testing.assert_array_equal(h, x)  # nothing added
    grads = [[np.zeros((N, C), np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32)] for _ in range(2)]
    K.layernorm_backward(*grads[0], dy, x, w, ref[1], ref[2])
    K.residual_layernorm_backward(grads[1][0], grads[1][0][:0], grads[1][1], grads[1][2], dy, x, w, ref[1], ref[2])
    for r, g in zip(*grads):
        np.testing.assert_array_equal(r, g)
