"""Prefill (a prompt through the tape with recording off): the same logits as a recorded
forward, while the tape keeps one layer's activations, not every layer's."""
import numpy as np

from nt.models.llama import Llama, LlamaConfig


def _model(n_layers: int, dtype=np.float32) -> Llama:
    cfg = LlamaConfig.preset("llama-tiny", vocab_size=96, n_layers=n_layers, block_size=48)
    return Llama(cfg, dtype=dtype, seed=1).eval()


def test_prefill_logits_equal_the_recorded_forward():
    """The KV-cache prefill and forward_inference (residual stream outside the tape,
    arenas rewound per layer) give the recorded forward's logits (to float64 rounding:
    the recorded forward runs the classifier on every row, the prefill on the last)."""
    model = _model(3, np.float64)
    idx = np.random.default_rng(0).integers(0, 96, (1, 40)).astype(np.int32)
    full, _ = model(idx)
    full = full.copy()
    model._begin_generation(41, 1)   # room for the prompt and one more token
    np.testing.assert_allclose(model._next_logits(idx)[0], full[0, -1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.forward_inference(idx).numpy()[..., :96], full, rtol=1e-12, atol=1e-12)
    # the cache the prefill filled serves the next token as a recompute would
    nxt = np.concatenate([idx, [[7]]], axis=1)
    again, _ = model(nxt)
    np.testing.assert_allclose(model._next_logits(nxt)[0], again[0, -1], rtol=1e-12, atol=1e-12)


def test_prefill_activation_memory_is_one_layers():
    """A 6-layer model's prefill leaves the tape's activation arena about a 1-layer
    model's (kept per layer it would be ~6x): nothing of a finished layer is kept."""
    idx = np.random.default_rng(1).integers(0, 96, (1, 48)).astype(np.int32)
    sizes = []
    for n_layers in (1, 6):
        model = _model(n_layers)
        model._begin_generation(48, 1)
        model._next_logits(idx)
        sizes.append(model.tape.acts.nbytes)
    assert sizes[1] < 1.2 * sizes[0]
