"""A whole GPT-2 training step on the CUDA backend matches the CPU: loss, every grad,
the AdamW update, and a second step that allocates nothing new."""
import numpy as np
import pytest

from nt.models.gpt2 import GPT2, GPT2Config
from nt.optim import AdamW, Chuck, clip_grad_norm

LR = 1e-2
TOL = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=1e-4, atol=2e-6)}


def _step(model, opt, idx, targets):
    logits, loss = model(idx, targets)
    logits = logits.copy()   # the backward overwrites the logits with their gradient (fused classifier)
    model.zero_grad()
    model.backward()
    norm = clip_grad_norm(model.params, 1.0)
    grads = np.array(model.tape.k.to_host(model.params.grad))  # a copy: on the CPU to_host is a view
    opt.step(loss=loss) if isinstance(opt, Chuck) else opt.step()
    return logits, loss, norm, grads


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpt2_step_matches_cpu(dtype):
    cfg = GPT2Config(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (2, 3)).astype(np.int32)
    targets = np.roll(idx, -1, axis=1)
    targets[1, -1] = -1  # an ignored position
    runs = {}
    for device in ("cpu", "cuda"):
        model = GPT2(cfg, device=device, dtype=dtype, seed=0)
        opt = AdamW(model.params, lr=LR, weight_decay=0.1)
        first = _step(model, opt, idx, targets)
        grows = (model.tape.acts.grows, model.tape.saved.grows)
        second = _step(model, opt, idx, targets)
        assert (model.tape.acts.grows, model.tape.saved.grows) == grows, "a steady step reallocated an arena"
        runs[device] = first, second, np.array(model.tape.k.to_host(model.params.flat))
    tol = TOL[dtype]
    for (c_logits, c_loss, c_norm, c_grads), (g_logits, g_loss, g_norm, g_grads) in zip(runs["cpu"][:2], runs["cuda"][:2]):
        np.testing.assert_allclose(g_loss, c_loss, **tol)
        np.testing.assert_allclose(g_logits, c_logits, **tol)
        np.testing.assert_allclose(g_norm, c_norm, **tol)
        np.testing.assert_allclose(g_grads, c_grads, **tol)
    # Adam divides by sqrt(v): a grad that is zero up to rounding moves its parameter by a
    # rounding-sized amount times lr / eps-ish factors, so params get an lr-relative atol.
    np.testing.assert_allclose(runs["cuda"][2], runs["cpu"][2], rtol=tol["rtol"], atol=max(tol["atol"], 1e-3 * LR))
    assert runs["cuda"][1][1] < runs["cuda"][0][1]  # the step lowered the loss


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("chuck", marks=pytest.mark.slow)])  # CI time: 15 s
def test_steady_cuda_step_allocates_no_device_memory(device_allocations, optimizer):
    """After the first step, a whole step (forward, backward, clipping, the optimizer,
    reading the loss) makes no device array: ids go to cached buffers, scratch is made once.
    (Chuck's noise events, off here, upload their per-tensor sigmas.)"""
    cfg = GPT2Config(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8)
    model = GPT2(cfg, device="cuda", dtype=np.float32, seed=0)
    opt = AdamW(model.params, lr=LR) if optimizer == "adamw" else Chuck(model.params, lr=LR, noise_patience=0)
    rng = np.random.default_rng(1)
    # step 0 sizes the arenas (growing by segments), step 1's reset merges them: steady from step 2
    batches = [rng.integers(0, cfg.vocab_size, (2, 4)).astype(np.int32) for _ in range(3)]
    made = device_allocations
    for i, idx in enumerate(batches):
        before = len(made)
        _step(model, opt, idx, np.roll(idx, -1, axis=1))
        if i == 0:
            assert made, "the first step sizes the arenas: the counter must have seen it"
        elif i == 2:
            assert made[before:] == [], f"a steady step allocated device arrays: {made[before:]}"


def test_step_uploads_are_few_and_asynchronous(monkeypatch):
    """A steady AdamW step copies three small host arrays to the device, each through a
    pinned staging buffer (asynchronous): the ids, the targets, the step count."""
    from nt.kernels.cuda import memory
    cfg = GPT2Config(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8)
    model = GPT2(cfg, device="cuda", dtype=np.float32, seed=0)
    opt = AdamW(model.params, lr=LR)
    uploads = []
    real = memory._upload
    monkeypatch.setattr(memory, "_upload", lambda dst, src: (uploads.append(src.copy()), real(dst, src)))
    rng = np.random.default_rng(2)
    for step in (1, 2):
        idx = rng.integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
        targets = np.roll(idx, -1, axis=1)
        del uploads[:]
        _step(model, opt, idx, targets)
        assert len(uploads) == 3, [u.shape for u in uploads]
        assert np.array_equal(uploads[0], idx) and np.array_equal(uploads[1].ravel(), targets.ravel())
        assert uploads[2].tolist() == [step]
