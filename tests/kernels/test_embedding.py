import numpy as np
import pytest

from helpers import check_grads, run_op
from nt import ops

IDS = np.array([[1, 4, 4, 0], [3, 1, 2, 4]], dtype=np.int32)  # repeated ids: grads must add up


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_forward_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    wte, wpe = rng.standard_normal((5, 70)), rng.standard_normal((6, 70))
    _, _, out = run_op(lambda t, p: ops.embedding(t, IDS, p["wte"], p["wpe"], pos0=1), {"wte": wte, "wpe": wpe}, dtype)
    np.testing.assert_allclose(out.data, wte[IDS] + wpe[1:5], rtol=1e-6, atol=1e-6)


def test_embedding_at_t_equal_one():
    """One position per row (decoding): position pos0 only."""
    rng = np.random.default_rng(3)
    ids = np.array([[4], [4], [2]], dtype=np.int32)
    wte, wpe = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
    _, _, out = run_op(lambda t, p: ops.embedding(t, ids, p["wte"], p["wpe"], pos0=3), {"wte": wte, "wpe": wpe})
    np.testing.assert_allclose(out.data, wte[ids] + wpe[3:4], rtol=1e-12)
    check_grads(lambda t, p: ops.embedding(t, ids, p["wte"], p["wpe"], pos0=3), {"wte": wte, "wpe": wpe})


def test_embedding_backward_finite_differences():
    rng = np.random.default_rng(1)
    check_grads(lambda t, p: ops.embedding(t, IDS, p["wte"], p["wpe"]),
                {"wte": rng.standard_normal((5, 70)), "wpe": rng.standard_normal((4, 70))})
    check_grads(lambda t, p: ops.embedding(t, IDS, p["wte"]), {"wte": rng.standard_normal((5, 3))})


def test_embedding_rejects_bad_ids():
    rng = np.random.default_rng(2)
    arrays = {"wte": rng.standard_normal((5, 3)), "wpe": rng.standard_normal((4, 3))}
    with pytest.raises(ValueError, match="outside"):
        run_op(lambda t, p: ops.embedding(t, IDS + 1, p["wte"], p["wpe"]), arrays)
    with pytest.raises(ValueError, match="outside"):
        run_op(lambda t, p: ops.embedding(t, IDS - 1, p["wte"], p["wpe"]), arrays)
    with pytest.raises(TypeError, match="integers"):
        run_op(lambda t, p: ops.embedding(t, IDS.astype(np.float32), p["wte"], p["wpe"]), arrays)
    with pytest.raises(ValueError, match="maximum sequence length"):
        run_op(lambda t, p: ops.embedding(t, IDS, p["wte"], p["wpe"], pos0=1), arrays)
