"""The ternary row dot (T2 rows . int8 activations) and BitNet models in the fused decoder."""
import numpy as np
import pytest
from numba import njit

from nt import bitnet
from nt.io.gguf import quantize
from nt.kernels.cpu import bitnet as kb
from nt.models import Llama, LlamaConfig

from infer.test_generate_quant import _step_logits, _tape_step_logits


@njit(cache=True)
def _rows(w, a, ad, asum, generic):
    """(row 0, then rows 1..4 of w in one pass) . a by the generic-IR or the host's kernel."""
    if generic:
        return kb._t2_rows_generic(w, (0,), a, ad, asum), kb._t2_rows_generic(w, (1, 2, 3, 4), a, ad, asum)
    return kb._t2_rows(w, (0,), a, ad, asum), kb._t2_rows(w, (1, 2, 3, 4), a, ad, asum)


def packed_case(rng, OC, C):
    """Random ternary rows with extreme rows (all +1, all -1, all 0) and int8 activation rows
    with the code extremes -128 and 127 in every plane."""
    codes = rng.integers(-1, 2, (OC, C)).astype(np.int8)
    codes[0], codes[1], codes[2] = 1, -1, 0
    scales = rng.uniform(0.01, 0.05, OC).astype(np.float16).astype(np.float32)
    a = rng.integers(-128, 128, (3, C)).astype(np.int8)
    a[0], a[1] = -128, 127
    return codes, scales, bitnet.pack_ternary(codes, scales), a


@pytest.mark.parametrize("C", [768, 144, 32, 4])   # 6 vector steps; 1 step + a 4-byte tail; tails only
def test_t2_row_dot_is_the_exact_integer_dot(C):
    rng = np.random.default_rng(C)
    codes, scales, w, a = packed_case(rng, 7, C)
    ad = rng.uniform(1e-3, 1.0, 3).astype(np.float32)
    asum = a.astype(np.int64).sum(axis=1).astype(np.int32)
    out = np.empty((3, 7), np.float32)
    kb.matmul_t2(out, a, ad, asum, w)
    isum = a.astype(np.int64) @ codes.T.astype(np.int64)   # the definition, in 64-bit integers
    np.testing.assert_array_equal(out, scales[None, :] * isum.astype(np.float32) * ad[:, None])
    # the vector loops (x86 intrinsics on AVX2 hosts, generic IR elsewhere), one row or four
    # rows per pass, give the same results
    for r in range(3):
        for generic in (True, False):
            one, four = _rows(w, a[r], ad[r:r + 1], asum[r:r + 1], generic)
            np.testing.assert_array_equal(np.array(one + four, np.float32), out[r, :5])


def test_t2_activation_quantiser_is_bitnets_absmax_rule():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 256)).astype(np.float32) * np.array([1, 1e-3, 0, 40], np.float32)[:, None]
    q, xd, xs = np.empty(256, np.int8), np.empty(1, np.float32), np.empty(1, np.int32)
    for row in x:
        kb.quantize_row_t2(q, xd, xs, row)
        a = max(np.abs(row).max(), np.float32(1e-5))
        np.testing.assert_array_equal(q, np.clip(np.rint(row * (np.float32(127) / a)), -128, 127).astype(np.int8))
        assert xd[0] == a / np.float32(127) and xs[0] == q.astype(np.int64).sum()


# ---------------------------------------------------------------------- BitNet Llama in the fused decoder

def bitnet_variants(seed=0):
    """An untrained BitNet Llama (random sub-norm weights) as the three inference models the
    benchmark compares: T2 (packed), Q8_0 blocks and float32 matrices of its ternary weights.
    Widths 128 / 192: whole vector steps and a scalar tail in the T2 row dot."""
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=300, block_size=32,
                      bitnet=True)
    model = Llama(cfg, seed=seed).eval()
    rng = np.random.default_rng(seed)
    for name in ("attn_sub_norm", "ffn_sub_norm"):
        model.params[name].data[...] = rng.uniform(0.5, 1.5, model.params[name].shape)
    t2 = bitnet.pack(model)
    q8 = Llama(cfg, seed=None, quantized={n: "Q8_0" for n in bitnet.BITLINEAR})
    f32 = Llama(cfg, seed=None)
    f32.bitlinear = frozenset()   # plain float matmuls of the (already ternary) weights
    for v in (q8, f32):
        for name, t in v.params.items():
            if name not in bitnet.BITLINEAR:
                t.data[...] = model.params[name].numpy()
        for name in bitnet.BITLINEAR:
            for l in range(cfg.n_layers):
                wq = bitnet.quantized_weight(model.params[name][l].numpy())[0]
                if v is q8:
                    q8.qweights[name][l] = quantize(wq, "Q8_0")
                else:
                    f32.params[name][l].data[...] = wq
    return model, {"T2": t2, "Q8_0": q8.eval(), "F32": f32.eval()}


@pytest.mark.parametrize("kind", ["T2", "Q8_0", "F32"])
def test_bitnet_fused_decoding_equals_the_tape_path(kind, monkeypatch):
    """The fused step (sub-norms, T2 rows with per-token int8 activations) computes what the
    tape path computes: the same quantisers and integer dots; the float parts (norms,
    attention, RoPE) are other kernels, so the logits agree to float32 rounding, plus the odd
    activation code that such rounding moves across a .5 (measured: < 4e-7 of the largest logit)."""
    _, models = bitnet_variants()
    model = models[kind]
    tokens = np.random.default_rng(1).integers(0, 300, 14).astype(np.int32)
    fused, tape = _step_logits(model, tokens, 4), _tape_step_logits(model, tokens, 4, monkeypatch)
    assert np.abs(fused - tape).max() <= 1e-4 * np.abs(tape).max()
    # generate() decodes every token after the prompt through the fused step
    calls = []
    step = Llama._decode_one
    monkeypatch.setattr(Llama, "_decode_one", lambda self, token, pos: calls.append(step(self, token, pos)) or calls[-1])
    out = model.generate(tokens[:4], 8, temperature=0)
    assert len(calls) == 7 and all(c is not None for c in calls)
    monkeypatch.setattr(Llama, "_decode_one", lambda self, token, pos: None)
    np.testing.assert_array_equal(model.generate(tokens[:4], 8, temperature=0), out)


def test_bitnet_latent_weights_and_bad_t2_rows_stay_off_the_fused_step():
    model, models = bitnet_variants()
    model._begin_generation(8, 1)
    model._next_logits(np.array([[1, 2, 3]]))
    assert model._decode_one(3, 3) is None    # latent float weights: the tape's BitLinear quantisers
    t2 = models["T2"]
    down = np.stack(t2.qweights["down"])
    t2.qweights["down"] = down[:, :, :-1].copy()             # a byte short: refused, not read past
    t2._begin_generation(8, 1)
    with pytest.raises(ValueError, match="quantised down must be"):
        t2._decode_one(1, 1)
    bad = down.copy()
    bad[1, 5, 3] = 0b11000000                                # a 2-bit field of 3: no ternary code
    t2.qweights["down"] = bad
    t2._begin_generation(8, 1)
    with pytest.raises(ValueError, match="no ternary code"):
        t2._decode_one(1, 1)
    assert kb.t2_codes_valid(down.reshape(-1, down.shape[-1])) and not kb.t2_codes_valid(bad.reshape(-1, 50))
