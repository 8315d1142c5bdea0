"""The CUDA Q8_0 / Q4_0 kernels against the CPU's, and a quantised GGUF Llama generating on CUDA."""
import numpy as np
import pytest

import nt
from nt import ops
from nt.io import gguf

cpu = nt.backend("cpu")
gpu = nt.backend("cuda")
SIZE = {"Q8_0": 34, "Q4_0": 18}


def _blocks_with_every_kind_of_scale(kind, rng):
    """Random quants under block scales that cover the half format: zero, subnormals, the
    smallest and largest normals, every exponent, both signs (inf/NaN scales are refused
    by the loaders, so they are left out)."""
    scales = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0x3555]
    scales += [(e << 10) | int(rng.integers(1024)) | (int(rng.integers(2)) << 15) for e in range(1, 31)]
    raw = rng.integers(0, 256, (len(scales), SIZE[kind]), dtype=np.uint8)
    raw[:, 0] = [s & 255 for s in scales]
    raw[:, 1] = [s >> 8 for s in scales]
    return raw.reshape(-1)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_dequantize_is_bit_identical_to_the_cpu(kind):
    raw = _blocks_with_every_kind_of_scale(kind, np.random.default_rng(0))
    n = raw.size // SIZE[kind] * 32
    want = np.empty(n, np.float32)
    getattr(cpu, f"dequantize_{kind.lower()}")(want, raw, cpu.F16_TABLE)
    got = gpu.empty(n, np.float32)
    getattr(gpu, f"dequantize_{kind.lower()}")(got, gpu.to_device(raw), gpu.F16_TABLE)
    np.testing.assert_array_equal(gpu.to_host(got).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_block_matmul_matches_the_cpu(kind):
    rng = np.random.default_rng(1)
    N, C, OC = 2, 96, 5                     # OC not a multiple of the warps in flight
    wq = gguf.quantize(rng.standard_normal((OC, C)).astype(np.float32), kind)
    x = rng.standard_normal((N, C)).astype(np.float32)
    want = np.empty((N, OC), np.float32)
    getattr(cpu, f"matmul_{kind.lower()}")(want, x, wq, cpu.F16_TABLE, np.zeros((64, 32), np.float32))
    out = gpu.to_device(np.full((N, OC), np.nan, np.float32))
    getattr(gpu, f"matmul_{kind.lower()}")(out, gpu.to_device(x), gpu.to_device(wq), gpu.F16_TABLE, None)
    np.testing.assert_allclose(gpu.to_host(out), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bad_shapes_are_refused():
    x, out = gpu.empty(2 * 64, np.float32).reshape(2, 64), gpu.empty(2 * 3, np.float32).reshape(2, 3)
    with pytest.raises(ValueError, match="matmul_q8_0"):
        gpu.matmul_q8_0(out, x, gpu.to_device(np.zeros((3, 2 * 18), np.uint8)))   # Q4_0-sized rows
    with pytest.raises(ValueError, match="matmul_q4_0"):
        gpu.matmul_q4_0(out[:, :2], x, gpu.to_device(np.zeros((3, 2 * 18), np.uint8)))
    with pytest.raises(ValueError, match="whole blocks"):
        gpu.dequantize_q8_0(gpu.empty(64, np.float32), gpu.to_device(np.zeros(67, np.uint8)))
    t = nt.tape.Tape("cuda", np.float32)
    with pytest.raises(TypeError, match="device"):   # host blocks on a CUDA tape
        ops.linear_q(t, t.new((2, 64)), np.zeros((3, 68), np.uint8), "Q8_0")


@pytest.mark.parametrize("kind", ["Q4_0", pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_quantized_gguf_llama_generates_on_cuda_as_on_the_cpu(tmp_path, kind):
    """keep_quantized on device="cuda": the blocks are uploaded, the prompt's prefill
    (DEQUANT_ROWS rows) goes through the dequantiser + matmul, each decoding step through
    the block matmul. The reference is the same file dequantised to float32 on the CPU (the
    CPU's quantised decoding rounds activations to int8, the GPU's keeps them float32):
    logits to 1e-4, the same greedy tokens."""
    from nt.models import Llama, LlamaConfig
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32, vocab_size=40, block_size=24,
                      tie_embeddings=False, rope_pairing="interleaved")
    path = tmp_path / "m.gguf"
    nt.models.gguf.write(path, Llama(cfg, seed=3), kind)
    gpu_model = nt.models.from_gguf(path, device="cuda", keep_quantized=True)
    cpu_model = nt.models.from_gguf(path, device="cpu")
    assert set(gpu_model.quantized) == {"qkvw", "attn_out", "gate_up", "down", "lm_head"} and not cpu_model.quantized
    prompt = np.arange(ops.DEQUANT_ROWS, dtype=np.int32) * 7 % 40
    got, want = np.array(gpu_model(prompt[None])[0]), np.array(cpu_model(prompt[None])[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(gpu_model.generate(prompt, 2, temperature=0),   # prefill + one decoding step
                                  cpu_model.generate(prompt, 2, temperature=0))
