"""Vision ops: patch unfolding / embedding, CLS token + positions, pooling, and the
classification cross-entropy over (N, classes): NumPy references (float32 and float64),
float64 finite differences, the smallest sizes, and bad inputs refused."""
import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import Tape, ops
from nt.tensor import Tensor


def unfold_reference(x, p):
    """(N, Ch, H, W) -> (N, P, Ch*p*p) with NumPy reshapes: rows of patches, (c, ky, kx) inside."""
    N, Ch, H, W = x.shape
    patches = x.reshape(N, Ch, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(N, (H // p) * (W // p), Ch * p * p)


TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, p", [((2, 3, 4, 6), 2), ((1, 1, 3, 3), 3), ((1, 2, 2, 2), 1)])
def test_unfold_patches_matches_numpy(dtype, shape, p):
    x = np.random.default_rng(0).standard_normal(shape)
    _, _, out = run_op(lambda t, q: ops.unfold_patches(t, q["x"], p), {"x": x}, dtype)
    np.testing.assert_allclose(out.data, unfold_reference(x, p), **TOL[dtype])


def test_patch_embed_is_a_strided_convolution():
    """patch_embed with weight (C, Ch*p*p) equals a Conv2d(kernel p, stride p) with that
    weight reshaped (C, Ch, p, p), computed here as explicit sums."""
    rng = np.random.default_rng(1)
    N, Ch, H, W, p, C = 2, 3, 4, 6, 2, 5
    x, w, b = rng.standard_normal((N, Ch, H, W)), rng.standard_normal((C, Ch * p * p)), rng.standard_normal(C)
    _, _, out = run_op(lambda t, q: ops.patch_embed(t, q["x"], q["w"], q["b"], p), {"x": x, "w": w, "b": b})
    conv = np.einsum("nchpwq,ocpq->nhwo", x.reshape(N, Ch, H // p, p, W // p, p), w.reshape(C, Ch, p, p)) + b
    np.testing.assert_allclose(out.data, conv.reshape(N, -1, C), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, p", [((2, 2, 4, 4), 2), ((1, 1, 1, 1), 1)])
def test_patch_embed_backward_finite_differences(shape, p):
    rng = np.random.default_rng(2)
    C = 3
    arrays = {"x": rng.standard_normal(shape), "w": rng.standard_normal((C, shape[1] * p * p)),
              "b": rng.standard_normal(C)}
    check_grads(lambda t, q: ops.patch_embed(t, q["x"], q["w"], q["b"], p), arrays)
    check_grads(lambda t, q: ops.unfold_patches(t, q["x"], p), {"x": arrays["x"]})


def test_unfold_refuses_bad_shapes():
    _, q, _ = run_op(lambda t, q: q["x"], {"x": np.ones((1, 1, 4, 6))})
    t = Tape("cpu", np.float64)
    with pytest.raises(ValueError, match="multiples"):
        ops.unfold_patches(t, q["x"], 4)
    with pytest.raises(ValueError, match="multiples"):
        ops.unfold_patches(t, q["x"], 0)
    with pytest.raises(ValueError, match="4 dims"):
        ops.unfold_patches(t, q["x"].view(4, 6), 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cls_tokens_matches_numpy(dtype):
    rng = np.random.default_rng(3)
    N, P, C = 3, 4, 5
    x, cls, pos = rng.standard_normal((N, P, C)), rng.standard_normal(C), rng.standard_normal((P + 1, C))
    _, _, out = run_op(lambda t, q: ops.cls_tokens(t, q["x"], q["cls"], q["pos"]), {"x": x, "cls": cls, "pos": pos},
                       dtype)
    want = np.concatenate([np.broadcast_to(cls, (N, 1, C)), x], axis=1) + pos
    np.testing.assert_allclose(out.data, want, **TOL[dtype])


@pytest.mark.parametrize("P", [3, 0])  # P = 0: the sequence is the CLS token alone
def test_cls_tokens_backward_finite_differences(P):
    rng = np.random.default_rng(4)
    N, C = 2, 3
    arrays = {"x": rng.standard_normal((N, max(P, 1), C)), "cls": rng.standard_normal(C),
              "pos": rng.standard_normal((P + 1, C))}

    def build(t, q):
        x = q["x"] if P else Tensor(q["x"].arena, q["x"].offset, (N, 0, C))  # no patches
        return ops.cls_tokens(t, x, q["cls"], q["pos"])
    check_grads(build, arrays)


def test_cls_tokens_refuses_mismatched_shapes():
    _, q, _ = run_op(lambda t, q: q["x"], {"x": np.ones((2, 3, 4)), "cls": np.ones(4), "pos": np.ones((3, 4))})
    with pytest.raises(ValueError, match="pos"):
        ops.cls_tokens(Tape("cpu", np.float64), q["x"], q["cls"], q["pos"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [5, 1])
def test_pooling_matches_numpy(dtype, T):
    x = np.random.default_rng(5).standard_normal((3, T, 4))
    _, _, mean = run_op(lambda t, q: ops.mean_pool(t, q["x"]), {"x": x}, dtype)
    np.testing.assert_allclose(mean.data, x.mean(axis=1), **TOL[dtype])
    _, _, first = run_op(lambda t, q: ops.cls_pool(t, q["x"]), {"x": x}, dtype)
    np.testing.assert_allclose(first.data, x[:, 0], **TOL[dtype])


@pytest.mark.parametrize("T", [5, 1])
def test_pooling_backward_finite_differences(T):
    x = np.random.default_rng(6).standard_normal((2, T, 3))
    check_grads(lambda t, q: ops.mean_pool(t, q["x"]), {"x": x})
    check_grads(lambda t, q: ops.cls_pool(t, q["x"]), {"x": x})


def test_pooling_refuses_bad_input():
    _, q, _ = run_op(lambda t, q: q["x"], {"x": np.ones((2, 3))})
    with pytest.raises(ValueError, match="3 dims"):
        ops.mean_pool(Tape("cpu", np.float64), q["x"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_over_classes_matches_numpy(dtype):
    """ops.cross_entropy on (N, classes) logits and (N,) labels is the classification loss."""
    rng = np.random.default_rng(7)
    logits, labels = rng.standard_normal((6, 10)) * 3, np.array([0, 9, 3, 3, 5, 1])
    _, _, loss = run_op(lambda t, q: ops.cross_entropy(t, q["z"], labels), {"z": logits}, dtype)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    np.testing.assert_allclose(loss.data[0], -logp[np.arange(6), labels].mean(), **TOL[dtype])
    check_grads(lambda t, q: ops.cross_entropy(t, q["z"], labels), {"z": logits})
    check_grads(lambda t, q: ops.cross_entropy(t, q["z"], np.array([2])), {"z": logits[:1]})  # N = 1
    with pytest.raises(ValueError, match="outside"):
        ops.cross_entropy(Tape("cpu", np.float64), run_op(lambda t, q: q["z"], {"z": logits})[1]["z"],
                          np.array([0, 10, 0, 0, 0, 0]))
