"""The fused decoding step runs a token in one parallel region whose threads claim units of
work through atomic counters (kernels/cpu/sync.py) and wait only for units already claimed:
any thread count gives the same bits, and a count the threading layer cannot run at once
(prange iterations then run one after another on one thread) still finishes."""
import numpy as np
import pytest
from numba import njit, prange

from nt.kernels.cpu import decode, sync
from nt.models import LlamaConfig

from .test_generate_quant import random_quantized_llama


@pytest.mark.parametrize("kind", [None, "Q8_0"])
@pytest.mark.parametrize("n_kv_heads", [2, 3])
def test_any_thread_count_gives_the_same_logits(kind, n_kv_heads):
    """1, 2 and more workers than the pool has: identical logits and KV cache, token after
    token. 6 q heads over 2 or 3 kv heads; the kv heads are a phase's units when the thread count divides
    them (2 kv heads: 1 and 2 threads; 3: 1 and 3), else the heads (rows, then attention).
    Rows not a multiple of 4 (the classifier's 301) or of the units."""
    cfg = LlamaConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=n_kv_heads, ffn_hidden=160,
                      vocab_size=301, block_size=32, tie_embeddings=False)
    model = random_quantized_llama(cfg, kind, np.random.default_rng(3)).eval()
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
