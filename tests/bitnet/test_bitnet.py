"""BitNet b1.58: quantisers, BitLinear forward/backward, the packed ternary matmul, a BitNet
Llama's training, packing, GGUF TQ2_0 export/import and checkpoints."""
import json

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from helpers import run_op

import nt
from nt import bitnet
from nt.io import load_model, save_checkpoint
from nt.io.gguf import quantize
from nt.models import Llama, LlamaConfig
from nt.models.gguf import load as load_gguf, write as write_gguf
from nt.optim import AdamW
from nt.tape import Tape

cpu = nt.backend("cpu")
EPS = np.float32(1e-5)


def numpy_weight_codes(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """The absmean rule: s = max(mean|W|, 1e-5), codes = clip(round(W / s), -1, 1), in W's float32."""
    s = np.float32(max(np.abs(w.astype(np.float64)).mean(), 1e-5))
    return np.clip(np.rint(w / s), -1, 1).astype(np.int8), s


def numpy_act_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The absmax rule per row: a = max(max|x|, 1e-5), codes = clip(round(x * 127 / a), -128, 127)."""
    a = np.maximum(np.abs(x).max(axis=1), EPS)
    codes = np.clip(np.rint(x * (np.float32(127) / a)[:, None]), -128, 127).astype(np.int8)
    return codes, a / np.float32(127)


def bitlinear_tape(x: np.ndarray, w: np.ndarray):
    """Run bitnet.bitlinear in float64 with x and w as parameters (both get grads);
    returns (tape, out, params)."""
    return run_op(lambda t, p: bitnet.bitlinear(t, p["x"], p["w"]), {"x": x, "w": w})


# ---------------------------------------------------------------------- quantisers

@pytest.mark.parametrize("shape", [(7, 33), (256, 512), (3, 1)])
def test_weight_codes_match_numpy_bitwise(shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    codes, s = bitnet.weight_quant(w)
    want_codes, want_s = numpy_weight_codes(w)
    assert np.float32(s) == want_s
    np.testing.assert_array_equal(codes, want_codes)
    wq, _ = bitnet.quantized_weight(w)
    np.testing.assert_array_equal(wq, want_codes.astype(np.float32) * want_s)   # what the forward multiplies by


def test_weight_scale_floor_on_zero_weights():
    codes, s = bitnet.weight_quant(np.zeros((2, 8), np.float32))
    assert s == pytest.approx(1e-5) and not codes.any()


def test_activation_codes_match_numpy_bitwise():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 512)).astype(np.float32) * np.array([1, 1e-3, 50, 0, 1], np.float32)[:, None]
    codes, xs = bitnet.act_quant(x)
    want_codes, want_xs = numpy_act_codes(x)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(xs, want_xs)
    assert codes[2].min() >= -128 and codes[2].max() <= 127 and np.abs(codes).max(axis=1)[[0, 1, 2, 4]].min() >= 127
    # the training kernel's dequantised activations are the same codes times the same scale
    xq, xs_train = np.empty_like(x), np.empty(5, np.float32)
    cpu.act_quant(xq, xs_train, x)
    np.testing.assert_array_equal(xq, want_codes.astype(np.float32) * want_xs[:, None])


# ---------------------------------------------------------------------- BitLinear

def test_bitlinear_forward_is_the_dequantised_matmul_of_quantised_activations():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 16)), rng.standard_normal((5, 16)) * 0.1
    _, _, out = bitlinear_tape(x, w)
    s = max(np.abs(w).mean(), 1e-5)
    wq = np.clip(np.rint(w / s), -1, 1) * s
    a = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    xq = np.clip(np.rint(x * (127 / a)), -128, 127) * (a / 127)
    np.testing.assert_allclose(out.numpy(), xq @ wq.T, rtol=1e-12, atol=1e-12)


def test_bitlinear_backward_is_the_straight_through_estimator():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((4, 16)), rng.standard_normal((6, 16)) * 0.1
    dout = rng.standard_normal((4, 6))
    t, params, out = bitlinear_tape(x, w)
    t.backward(out, dout)
    s = max(np.abs(w).mean(), 1e-5)
    wq = np.clip(np.rint(w / s), -1, 1) * s
    a = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    xq = np.clip(np.rint(x * (127 / a)), -128, 127) * (a / 127)
    # both quantisers count as the identity: the grads of xq @ wq^T, sent to x and to the latent w
    np.testing.assert_allclose(params["x"].grad, dout @ wq, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(params["w"].grad, dout.T @ xq, rtol=1e-12, atol=1e-12)
    t.backward(out, dout)   # parameter grads accumulate
    np.testing.assert_allclose(params["w"].grad, 2 * dout.T @ xq, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- packed ternary matmul

def test_packed_matmul_equals_the_integer_reference_exactly():
    rng = np.random.default_rng(4)
    OC, C, N = 9, 768, 3
    codes = rng.integers(-1, 2, (OC, C)).astype(np.int8)
    codes[0] = 0                                                # an all-zero row
    scales = rng.uniform(0.01, 0.05, OC).astype(np.float16).astype(np.float32)
    w = bitnet.pack_ternary(codes, scales)
    x = rng.standard_normal((N, C)).astype(np.float32)
    q, xs = bitnet.act_quant(x)
    t = Tape()
    xt = t.new((N, C))
    xt.data[...] = x
    out = bitnet.linear_t2(t, xt, w).numpy()
    # the definition: an exact integer dot product per output, then the row scale, then the activation scale
    isum = q.astype(np.int64) @ codes.T.astype(np.int64)
    np.testing.assert_array_equal(out, scales[None, :] * isum.astype(np.float32) * xs[:, None])
    # a prefill's many rows take the expand-then-BLAS path: the same products, a float sum
    N = bitnet.DEQUANT_ROWS
    x = rng.standard_normal((N, C)).astype(np.float32)
    q, xs = bitnet.act_quant(x)
    xt = t.new((N, C))
    xt.data[...] = x
    want = scales[None, :] * (q.astype(np.int64) @ codes.T.astype(np.int64)) * xs[:, None].astype(np.float64)
    np.testing.assert_allclose(bitnet.linear_t2(t, xt, w).numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_packed_layout_and_gguf_ternary_conversion(qtype):
    rng = np.random.default_rng(5)
    codes = rng.integers(-1, 2, (4, 512)).astype(np.int8)
    rows = bitnet.pack_ternary(codes, 0.0371)
    assert rows.shape == (4, 512 // 4 + 2) and rows.dtype == np.uint8   # 2 bits per weight + an f16 scale per row
    want = codes.astype(np.float32) * np.float32(np.float16(0.0371))
    np.testing.assert_array_equal(bitnet.unpack_weights(rows), want)
    tq = bitnet.to_gguf_rows(rows, qtype)
    assert tq.shape == (4, 2 * bitnet.GGUF_TYPES[qtype])
    # the bytes are ggml's (the gguf package's quantiser) and decode to the same values
    Q = gguf.GGMLQuantizationType[qtype]
    np.testing.assert_array_equal(tq, np.asarray(gguf.quants.quantize(want, Q)))
    np.testing.assert_array_equal(gguf_dequantize(tq, Q), want)
    np.testing.assert_array_equal(bitnet.from_gguf_rows(tq, qtype), rows)
    mixed = quantize(want * np.repeat([[1.0, 0.5]], 256, axis=1).astype(np.float32), qtype)  # two scales in a row
    with pytest.raises(ValueError, match="one scale per row"):
        bitnet.from_gguf_rows(mixed, qtype)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        bitnet.pack_ternary(np.full((1, 256), 2, np.int8), 0.1)
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        bitnet.pack_ternary(np.full((1, 256), 0.5), 0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        bitnet.pack_ternary(np.zeros((2, 102), np.int8), 0.1)
    with pytest.raises(ValueError, match="scale"):
        bitnet.pack_ternary(np.zeros((2, 256), np.int8), float("nan"))
    with pytest.raises(ValueError, match="blocks of 256"):
        quantize(np.zeros((2, 100), np.float32), "TQ2_0")
    t = Tape()
    x = t.new((1, 66))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        bitnet.linear_t2(t, x, np.zeros((4, 18), np.uint8))
    x = t.new((1, 256))
    with pytest.raises(ValueError, match="T2 rows"):
        bitnet.linear_t2(t, x, np.zeros((4, 34), np.uint8))
    with pytest.raises(ValueError, match="multiples of 256"):   # GGUF's TQ2_0: llama-tiny's width is 64
        write_gguf(tmp_path / "tiny.gguf", Llama(LlamaConfig.preset("llama-tiny", bitnet=True)), "TQ2_0")
    with pytest.raises(ValueError, match="BitNet"):
        bitnet.pack(Llama(LlamaConfig.preset("llama-tiny")))
    with pytest.raises(ValueError, match="qkv_bias"):
        LlamaConfig(bitnet=True, qkv_bias=True)


# ---------------------------------------------------------------------- the model

def small_config(**kw) -> LlamaConfig:
    return LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256, vocab_size=97, block_size=32,
                       norm_eps=2.0 ** -16, bitnet=True, **kw)   # eps exact in GGUF's float32


def test_bitnet_llama_layout_and_training_lowers_the_loss():
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=40, block_size=16,
                      bitnet=True)
    model = Llama(cfg, seed=0)
    assert model.params["attn_sub_norm"].shape == (2, 32) and model.params["ffn_sub_norm"].shape == (2, 64)
    rng = np.random.default_rng(6)
    idx = rng.integers(0, 40, (4, 16))
    tgt = np.roll(idx, -1, axis=1)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(25):
        _, loss = model(idx, tgt)
        model.zero_grad()
        model.backward()
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0] - 1.0, losses


def test_packed_model_generates_what_the_trained_model_computes():
    model = Llama(small_config(), seed=1).eval()
    packed = bitnet.pack(model)
    assert "qkvw" not in packed.params and packed.qweights["down"][1].shape == (256, 256 // 4 + 2)
    idx = np.random.default_rng(7).integers(0, 97, (1, 12))
    a = model.forward_inference(idx).numpy()[0, :, :97].copy()
    b = packed.forward_inference(idx).numpy()[0, :, :97].copy()
    # the packed scales are float16: the logits agree to about their precision
    np.testing.assert_allclose(b, a, atol=2e-2 * np.abs(a).max())
    # prefill then decoding with the KV cache = full forwards on the packed weights
    prompt = idx[0, :5]
    out = packed.generate(prompt, 6, temperature=0)
    full = np.concatenate([prompt, np.zeros(6, np.int64)])
    for i in range(6):
        full[5 + i] = int(np.argmax(packed.forward_inference(full[None, :5 + i]).numpy()[0, -1, :97]))
    np.testing.assert_array_equal(out, full)
    _, loss = packed(idx, idx)
    with pytest.raises(RuntimeError, match="forward-only"):
        packed.backward()


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_ternary_export_load_same_logits(tmp_path, qtype):
    model = Llama(small_config(), seed=2).eval()
    packed = bitnet.pack(model)
    write_gguf(tmp_path / "m.gguf", model, qtype)
    write_gguf(tmp_path / "p.gguf", packed, qtype)
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "p.gguf").read_bytes()
    loaded = load_gguf(tmp_path / "m.gguf")
    assert loaded.config == model.config and set(loaded.quantized.values()) == {"T2"}
    idx = np.random.default_rng(8).integers(0, 97, (2, 10))
    np.testing.assert_array_equal(loaded.forward_inference(idx).numpy(), packed.forward_inference(idx).numpy())
    # the gguf package reads the same ternary values nt multiplies by
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType[qtype]
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = gguf_dequantize(tensors["blk.1.ffn_down.weight"].data, gguf.GGMLQuantizationType[qtype])
    codes, scale = bitnet.weight_quant(model.params["down"][1].numpy())
    np.testing.assert_array_equal(down, codes * np.float32(np.float16(scale)))   # the scale is stored as float16
    with pytest.raises(ValueError, match="TQ2_0"):
        write_gguf(tmp_path / "q.gguf", model, "Q8_0")
    with pytest.raises(ValueError, match="TQ2_0"):
        write_gguf(tmp_path / "q.gguf", Llama(LlamaConfig.preset("llama-tiny")), "TQ2_0")


def test_checkpoint_round_trip_and_older_configs(tmp_path):
    model = Llama(small_config(), seed=3).eval()
    save_checkpoint(tmp_path / "c", model)
    back = load_model(tmp_path / "c").eval()
    assert back.config.bitnet and back.bitlinear == model.bitlinear
    idx = np.random.default_rng(9).integers(0, 97, (1, 8))
    np.testing.assert_array_equal(back.forward_inference(idx).numpy(), model.forward_inference(idx).numpy())
    # a checkpoint written before the field existed loads as a plain Llama
    plain = Llama(LlamaConfig.preset("llama-tiny"), seed=0)
    save_checkpoint(tmp_path / "old", plain)
    cfg_path = tmp_path / "old" / "config.json"
    meta = json.loads(cfg_path.read_text())
    del meta["config"]["bitnet"]
    cfg_path.write_text(json.dumps(meta))
    assert load_model(tmp_path / "old").config.bitnet is False
