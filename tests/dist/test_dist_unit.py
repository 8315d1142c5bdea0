"""nt.dist without MPI: ranks are threads, NCCLComm runs on a fake of CuPy's NCCL over host
memory, and data parallel (plain and ZeRO-1) must equal one process stepping on the mean
of the ranks' grads, to 1e-12 in float64 and 1e-6 in float32."""
import sys
from pathlib import Path

import numpy as np
import pytest

import nt
from nt import dist
from nt.optim import AdamW, Chuck, clip_factor

sys.path.insert(0, str(Path(__file__).parent))
from fake_nccl import FakeHost, FakeNCCL, run_ranks  # noqa: E402

# 3 ranks do not divide these 79 elements: shards of 26, 26, 27 that cut through tensors
LAYOUT = [("w", (6, 5), True), ("b", (5,), False), ("e", (40,), True), ("g", (4,), False)]
STEPS, CLIP = 4, 0.5


def make_params(dtype):
    params = nt.Params("cpu", dtype, LAYOUT)
    params.flat[:] = np.random.default_rng(0).standard_normal(params.size)
    return params


def rank_grads(size, n, step, rank):
    """The grads rank `rank` computes at `step` (norm well above CLIP: clipping is active)."""
    return np.random.default_rng((step, rank, size)).standard_normal(n) * 3.0


def reference(dtype, size):
    """One process, stepping on the mean of the ranks' grads, clipped to the global norm."""
    params = make_params(dtype)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        params.grad[:] = np.mean([rank_grads(size, params.size, step, r) for r in range(size)], axis=0)
        norm, clip = clip_factor(params, CLIP)
        assert clip < 1.0
        opt.step(grad_scale=clip)
    return params.flat.copy(), opt.state_dict()


def data_parallel(dtype, size, zero):
    """The same run on `size` thread ranks over NCCLComm; each rank's (params, state_dict)."""
    nccl = FakeNCCL(None)

    def rank_fn(rank, group):
        nccl.group = group
        world = dist.World(dist.NCCLComm(FakeHost(group, rank), nccl=nccl))
        params = make_params(dtype)
        params.flat[:] += rank   # different starting points: the broadcast makes them rank 0's
        world.broadcast_params(params)
        dp = dist.DataParallel(params, lambda p: AdamW(p, lr=1e-2, weight_decay=0.1), zero=zero, w=world)
        for step in range(STEPS):
            params.grad[:] = rank_grads(size, params.size, step, rank)
            dp.sync_grads()
            norm, clip = dp.clip_factor(CLIP)
            dp.step(grad_scale=clip)
        return params.flat.copy(), dp.state_dict(), dp.state_bytes()
    return run_ranks(size, rank_fn), nccl


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("zero", [0, 1])
def test_data_parallel_equals_one_process_on_mean_grads(dtype, tol, zero):
    size = 3
    want_params, want_state = reference(dtype, size)
    ranks, nccl = data_parallel(dtype, size, zero)
    scale = np.abs(want_params).max()
    for params, state, state_bytes in ranks:
        np.testing.assert_allclose(params, want_params, rtol=0, atol=tol * scale)
        for name in ("m", "v"):
            np.testing.assert_allclose(state[name], want_state[name], rtol=0, atol=tol * np.abs(want_state[name]).max())
        assert state["step_count"] == STEPS
        full = 2 * want_params.size * np.dtype(dtype).itemsize
        # ZeRO keeps the moments of this rank's shard only: 27 or 26 of the 79 elements
        assert state_bytes == (full if not zero else pytest.approx(full / size, rel=0.05))
    used = {name for _, name in nccl.calls}
    assert used == ({"broadcast", "allReduce"} if not zero else {"broadcast", "reduce"})


def test_zero_state_loads_on_another_rank_count():
    """A ZeRO run's gathered state, loaded on 2 ranks, gives each its slice; gathered again it is the same."""
    (_, state, _), *_ = data_parallel(np.float64, 3, 1)[0]

    def rank_fn(rank, group):
        world = dist.World(dist.NCCLComm(FakeHost(group, rank), nccl=FakeNCCL(group)))
        dp = dist.DataParallel(make_params(np.float64), lambda p: AdamW(p, lr=1e-2), zero=1, w=world)
        dp.load_state_dict(state)
        lo, hi = dp.shard.lo, dp.shard.hi
        np.testing.assert_array_equal(dp.optimizer.m, state["m"][lo:hi])
        return dp.state_dict()
    for again in run_ranks(2, rank_fn):
        for name in ("m", "v"):
            np.testing.assert_array_equal(again[name], state[name])


def test_single_rank_is_the_plain_optimizer():
    world = dist.World(dist.SelfComm())
    a, b = make_params(np.float64), make_params(np.float64)
    dp = dist.DataParallel(a, lambda p: AdamW(p, lr=1e-2), zero=1, w=world)
    opt = AdamW(b, lr=1e-2)
    for step in range(3):
        a.grad[:] = b.grad[:] = rank_grads(1, a.size, step, 0)
        dp.sync_grads()
        assert dp.clip_factor(CLIP) == clip_factor(b, CLIP)
        dp.step(grad_scale=0.5)
        opt.step(grad_scale=0.5)
    np.testing.assert_array_equal(a.flat, b.flat)


def test_zero_refuses_chuck():
    world = dist.World(dist.SelfComm())
    with pytest.raises(ValueError, match="Chuck keeps per-tensor statistics"):
        dist.DataParallel(make_params(np.float32), lambda p: Chuck(p, lr=1e-3), zero=1, w=world)


def test_partition_and_fingerprint():
    for n, size in [(79, 3), (10, 1), (5, 8), (1 << 20, 7)]:
        counts = np.diff(dist.partition(n, size))
        assert counts.sum() == n and np.all(counts[:-1] == n // size) and counts[-1] == n // size + n % size
    a = np.arange(10, dtype=np.int32)
    assert dist.fingerprint({"lr": 1}, a) == dist.fingerprint({"lr": 1}, a.copy())
    assert dist.fingerprint({"lr": 1}, a) != dist.fingerprint({"lr": 2}, a)
    assert dist.fingerprint(a) != dist.fingerprint(a.astype(np.int64))


def test_check_same_names_the_rank_that_differs():
    def rank_fn(rank, group):
        world = dist.World(FakeHost(group, rank))
        world.check_same("settings", {"lr": 1e-3})
        world.check_same("settings", {"lr": 1e-3 if rank != 2 else 2e-3})
    with pytest.raises(ValueError, match=r"settings differ between ranks: rank\(s\) \[2\]"):
        run_ranks(3, rank_fn)


def test_ranked_source_positions_count_the_whole_world():
    """2 ranks at position 8 each have used 16 windows; on 4 ranks that is position 4 each."""
    tokens = np.arange(2000, dtype=np.uint16) % 7
    two = dist.RankedSource(nt.data.DataLoader(tokens, 4, 8, rank=1, world_size=2),
                            dist.World(_Rank(1, 2)))
    two.next_batch(), two.next_batch()
    state = two.state()
    assert state["position"] == 16
    four = dist.RankedSource(nt.data.DataLoader(tokens, 2, 8, rank=3, world_size=4), dist.World(_Rank(3, 4)))
    four.set_state(state)
    assert four.loader.position == 4
    three = dist.RankedSource(nt.data.DataLoader(tokens, 2, 8, rank=0, world_size=3), dist.World(_Rank(0, 3)))
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        three.set_state(state)
    with pytest.raises(ValueError, match="not split across the 2 ranks"):
        dist.RankedSource(nt.data.DataLoader(tokens, 4, 8), dist.World(_Rank(0, 2)))


class _Rank(dist.SelfComm):
    def __init__(self, rank, size):
        self.rank, self.size = rank, size
