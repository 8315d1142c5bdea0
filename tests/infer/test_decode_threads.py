"""The fused decoding step runs a token in one parallel region whose threads claim units of
work through atomic counters (kernels/cpu/sync.py) and wait only for units already claimed:
any thread count gives the same bits, and a count the threading layer cannot run at once
(prange iterations then run one after another on one thread) still finishes."""
import numpy as np
import pytest
from numba import njit, prange

from nt.io import gguf
from nt.kernels.cpu import decode, sync
from nt.models import Llama, LlamaConfig


def _model(kind):
    """Grouped-query heads (3 q heads a kv head, 2 kv heads: 1 and 2 threads split them per kv
    head, 3 and 5 per head), rows not a multiple of 4 (the classifier) or of the units, the given
    block type on every matrix (None: float32)."""
    rng = np.random.default_rng(3)
    cfg = LlamaConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=160, vocab_size=301, block_size=32,
                      tie_embeddings=False)
    names = ("qkvw", "attn_out", "gate_up", "down", "lm_head")
    q = Llama(cfg, seed=0, quantized=dict.fromkeys(names, kind) if kind else None)
    for name in q.quantized:
        shape = Llama(cfg, seed=0).params[name].shape
        blocks = [gguf.quantize(rng.standard_normal(shape[-2:]).astype(np.float32) * 0.1, kind)
                  for _ in range(cfg.n_layers if name != "lm_head" else 1)]
        q.qweights[name] = blocks if name != "lm_head" else blocks[0]
    return q.eval()


@pytest.mark.parametrize("kind", [None, "Q8_0"])
def test_any_thread_count_gives_the_same_logits(kind):
    """1, 2 and more workers than the pool has: identical logits and KV cache, token after token."""
    model = _model(kind)
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    runs = {}
    for nthreads in (1, 2, 3, 5):
        model._begin_generation(len(tokens), 1)
        model._next_logits(tokens[None, :3])
        first = model._decode_one(int(tokens[3]), 3)   # numba's thread count; builds the step's arguments
        plan, out = model._decode_plan, []
        for pos in range(3, len(tokens)):               # position 3 again: its cache row rewritten
            logits = np.empty(plan[-1], np.float32)
            decode.llama_decode_step(logits, int(tokens[pos]), pos, *plan[1:-1], nthreads)
            out.append(logits)
        np.testing.assert_array_equal(out[0], first)
        assert np.isfinite(out[-1]).all()
        runs[nthreads] = (np.stack(out), model._kv_all.data.copy())
    for nthreads in (2, 3, 5):
        np.testing.assert_array_equal(runs[nthreads][0], runs[1][0])
        np.testing.assert_array_equal(runs[nthreads][1], runs[1][1])


@njit(parallel=True, cache=True)
def _count(ctr, n, nthreads):
    for _ in prange(nthreads):
        while sync.fetch_add(ctr, 0, 1) < n:
            sync.fetch_add(ctr, sync.LINE, 1)
        sync.wait_at_least(ctr, sync.LINE, n)


def test_atomic_counters_count_every_claim_once():
    for nthreads in (1, 2, 4):
        ctr = np.zeros(2 * sync.LINE, np.int64)
        _count(ctr, 20000, nthreads)
        assert ctr[sync.LINE] == 20000 and ctr[0] == 20000 + nthreads
