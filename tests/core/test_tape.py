import numpy as np
import pytest

from nt import Tape, ops
from nt.data import DataLoader
from nt.models import GPT2, GPT2Config
from nt.optim import AdamW, clip_factor
from helpers import make_params, measure_step_allocations


def test_steady_state_training_step_allocates_nothing(monkeypatch):
    """After the first step sized the arenas, a whole step (data, forward, backward,
    clipping, AdamW) creates no new arrays: no arena regrows, no Numba kernel allocates,
    and Python-side memory never peaks anywhere near the size of one activation.

    Numba's runtime records one small bookkeeping block (a MemInfo, no data) per NumPy
    array passed into a kernel; a kernel that allocated would add more than that."""
    cfg = GPT2Config(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=256)
    model = GPT2(cfg, seed=0)
    opt = AdamW(model.params, lr=1e-3, weight_decay=0.1)
    loader = DataLoader(np.arange(20000) % 256, B=8, T=64)

    def step():
        x, y = loader.next_batch()
        model.forward(x, y)
        model.zero_grad()
        model.backward()
        _, clip = clip_factor(model.params, 1.0)  # clipping inside the update, as the scripts do
        opt.step(grad_scale=clip)

    step()
    step()
    arenas = (model.tape.acts, model.tape.saved)
    buffers = [(a.buf, a.gbuf) for a in arenas]
    grows = [a.grows for a in arenas]
    one_activation = 8 * 64 * 256 * 4  # bytes of one (B, T, C) float32 tensor

    array_args, nrt_allocs, peak = measure_step_allocations(monkeypatch, model.tape.k, step)

    assert [a.grows for a in arenas] == grows
    assert all(a.buf is b and a.gbuf is g for a, (b, g) in zip(arenas, buffers))
    assert array_args > 100
    assert nrt_allocs == array_args, "a kernel allocated memory"
    assert peak < one_activation // 4, f"a step peaked at {peak} bytes of new Python memory"


def test_reset_reuses_offsets():
    params = make_params({"x": np.ones((4, 8)), "w": np.ones(8)})
    tape = Tape("cpu", np.float64)
    first = ops.layernorm(tape, params["x"], params["w"])
    tape.reset()
    second = ops.layernorm(tape, params["x"], params["w"])
    assert (first.offset, first.shape) == (second.offset, second.shape)


def test_arena_grows_without_copying_and_merges_at_reset():
    """A full arena takes a new segment (earlier tensors keep their memory and values, so the
    first step never holds two copies of the arena); reset() merges the segments into one
    buffer of the step's size, and the same allocations then fit without growing."""
    tape = Tape("cpu", np.float64)
    arena = tape.saved
    a = arena.alloc((3, 5))
    a.data[:] = 7.0
    first = a.data
    b = arena.alloc((100,))           # does not fit: a segment, not a copy
    b.data[:] = 1.0
    assert arena.more and a.data is first and np.all(a.data == 7.0) and np.all(b.data == 1.0)
    assert np.shares_memory(a.data, first) and not np.shares_memory(a.data, b.data)
    c = arena.alloc((1000,))
    c.data[:] = 3.0
    assert np.all(a.data == 7.0) and np.all(b.data == 1.0)
    top, grows = arena.top, arena.grows
    arena.reset()
    assert not arena.more and arena.buf.shape[0] == top
    for shape in ((3, 5), (100,), (1000,)):
        arena.alloc(shape)
    assert arena.grows == grows and not arena.more and arena.top == top


def test_backward_needs_a_recorded_tape_tensor():
    params = make_params({"x": np.ones((2, 3))})
    tape = Tape("cpu", np.float64)
    out = ops.gelu(tape, params["x"])
    with pytest.raises(ValueError, match="seed grad"):
        tape.backward(out, np.ones((3, 2)))
    with pytest.raises(ValueError, match="this tape"):
        tape.backward(params["x"])
    tape.reset(recording=False)
    out = ops.gelu(tape, params["x"])
    with pytest.raises(RuntimeError, match="without recording"):
        tape.backward(out)


def test_tensor_views_and_bad_dtype():
    params = make_params({"w": np.arange(24.0).reshape(2, 3, 4)})
    w = params["w"]
    assert np.array_equal(w[1].data, np.arange(12.0, 24.0).reshape(3, 4))
    assert np.array_equal(w.view(6, 4).data[5], np.arange(20.0, 24.0))
    with pytest.raises(IndexError):
        w[2]
    with pytest.raises(ValueError):
        w.view(5, 5)
    with pytest.raises(TypeError, match="float32 or float64"):
        Tape("cpu", np.int32)
    with pytest.raises(ValueError, match="unknown device"):
        Tape("tpu")


def test_activation_grads_share_memory_as_their_lifetimes_allow():
    """An activation's grad lives from the first backward that touches it to its producer's
    backward; dead slots are reused, so the grad buffer is far smaller than the activations
    while every parameter grad stays exact (the GPT-2 tests compare them with a reference)."""
    from nt.models import GPT2, GPT2Config
    model = GPT2(GPT2Config(block_size=32, vocab_size=64, n_layer=4, n_head=2, n_embd=32), seed=0)
    idx = np.random.default_rng(0).integers(0, 64, (2, 32)).astype(np.int32)
    model.forward(idx, np.roll(idx, -1, 1))
    model.backward()
    acts = model.tape.acts
    assert acts.gbuf.shape[0] < acts.top // 3
    _, loss = model.forward(idx, np.roll(idx, -1, 1))   # a new forward: no plan until its backward
    with pytest.raises(RuntimeError, match="only while tape.backward"):
        loss.grad


def test_grad_slots_never_overlap_while_alive():
    from nt.tensor import ActivationArena
    arena = ActivationArena("cpu", np.float64, "t")
    blocks = [arena.alloc((n,)) for n in (16, 48, 16, 32, 64)]
    touches = [[4], [4, 3], [3, 1], [2, 1], [0, 2], [0]]
    arena.plan_grads(touches)
    live = {}
    for s, step in enumerate(touches):
        for i in step:
            live.setdefault(i, [s, s])[1] = s
    spans = {i: arena.block_span(i) for i in live}
    for i in live:
        for j in live:
            if i < j and not (live[i][1] < live[j][0] or live[j][1] < live[i][0]):   # alive together
                (gi, si), (gj, sj) = spans[i], spans[j]
                assert gi + si <= gj or gj + sj <= gi, (i, j)
    assert arena.gbuf.shape[0] < sum(b.size for b in blocks)


def test_params_init_draws_in_chunks_as_one_call_would():
    """Params.init_ fills a tensor from the generator a chunk at a time (no float64 copy of a
    whole model): the values equal one rng.normal call; padded rows are zeroed after."""
    from nt import Params
    params = Params("cpu", np.float32, [("w", (1100, 1000), True), ("b", (3,), False)])
    params.init_("w", std=0.02, rng=np.random.default_rng(9), zero_rows_from=1050)
    want = np.random.default_rng(9).normal(0.0, 0.02, (1100, 1000)).astype(np.float32)
    want[1050:] = 0.0
    np.testing.assert_array_equal(params["w"].data, want)
    params.init_("b", 1.0)
    assert np.all(params["b"].data == 1.0)
