import math

import numpy as np
import pytest

from nt.data import DataLoader, builtin_corpus_text, byte_tokens_to_text, text_to_byte_tokens
from nt.optim import CosineSchedule, clip_grad_norm, grad_norm
from helpers import make_params


def test_loader_targets_are_next_tokens_and_epochs_wrap():
    tokens = np.arange(1000) % 251
    loader = DataLoader(tokens, B=4, T=10, shuffle=True, seed=1)
    seen = set()
    for _ in range(loader.batches_per_epoch):
        x, y = loader.next_batch()
        assert np.array_equal(y[:, :-1], x[:, 1:])
        seen.update(int(v) for v in x[:, 0])
    assert len(seen) == 4 * loader.batches_per_epoch  # every window once per epoch
    loader.next_batch()
    assert loader.epoch == 1


def test_loader_ranks_split_without_overlap_and_resume():
    tokens = np.arange(2001)
    starts = []
    for rank in range(2):
        loader = DataLoader(tokens, B=2, T=10, rank=rank, world_size=2)
        for _ in range(loader.batches_per_epoch):
            starts.append(set(int(v) for v in loader.next_batch()[0][:, 0]))
    flat = [s for group in starts for s in group]
    assert len(flat) == len(set(flat))
    a = DataLoader(tokens, B=2, T=10, shuffle=True, seed=3)
    a.next_batch()
    state = a.state()
    expected = a.next_batch()[0].copy()
    b = DataLoader(tokens, B=2, T=10, shuffle=True, seed=3)
    b.set_state(state)
    assert np.array_equal(b.next_batch()[0], expected)


def test_loader_rejects_bad_input():
    with pytest.raises(ValueError, match="too few"):
        DataLoader(np.arange(50), B=4, T=16)
    with pytest.raises(ValueError, match="vocab size"):
        DataLoader(np.arange(500), B=2, T=8, vocab_size=256)
    with pytest.raises(ValueError, match="rank"):
        DataLoader(np.arange(500), B=2, T=8, rank=2, world_size=2)


def test_builtin_corpus_is_english_and_bytes_round_trip():
    text = builtin_corpus_text()
    assert len(text) > 2_000_000 and text.count(" the ") > 10_000
    assert byte_tokens_to_text(text_to_byte_tokens("héllo ✓")) == "héllo ✓"


def test_clip_grad_norm_scales_to_max():
    params = make_params({"a": np.zeros(3), "b": np.zeros(4)})
    params.grad[:] = np.arange(7.0)
    norm = math.sqrt(sum(i * i for i in range(7)))
    assert abs(grad_norm(params) - norm) < 1e-12
    assert abs(clip_grad_norm(params, 1.0) - norm) < 1e-12
    assert abs(grad_norm(params) - 1.0) < 1e-5


def test_cosine_schedule():
    s = CosineSchedule(1.0, warmup=10, total=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
