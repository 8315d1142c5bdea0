"""BitNet's BitLinear CUDA kernels against their CPU twins (simulator in CI), and a BitNet
Llama's loss and grads on device='cuda' against the CPU's."""
import numpy as np
import pytest

import nt
from nt.models import Llama, LlamaConfig

cpu = nt.backend("cpu")
gpu = nt.backend("cuda")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bitlinear_kernels_match_cpu(dtype):
    rng = np.random.default_rng(0)
    N, C, OC = 3, 16, 5
    x, w = rng.standard_normal((N, C)).astype(dtype), rng.standard_normal((OC, C)).astype(dtype)
    x[1] = 0.0   # an all-zero row: its scale is the EPS floor
    dout = rng.standard_normal((N, OC)).astype(dtype)
    dx0, dw0 = rng.standard_normal((N, C)).astype(dtype), rng.standard_normal((OC, C)).astype(dtype)
    host = dict(out=np.zeros((N, OC), dtype), xq=np.zeros((N, C), dtype), xs=np.zeros(N, dtype),
                wq=np.zeros((OC, C), dtype), scale=np.zeros(1, dtype))
    dev = {k: gpu.to_device(v) for k, v in host.items()}
    cpu.bitlinear_forward(*host.values(), x, w)
    gpu.bitlinear_forward(*dev.values(), gpu.to_device(x), gpu.to_device(w))
    # activation codes and scales are exact; the weight scale is a float64 sum in another
    # order (a few ulps), which must leave the ternary codes identical
    for k in ("xq", "xs"):
        np.testing.assert_array_equal(gpu.to_host(dev[k]), host[k], err_msg=k)
    for k in ("out", "wq", "scale"):
        np.testing.assert_allclose(gpu.to_host(dev[k]), host[k], rtol=1e-5, atol=1e-6, err_msg=k)
    codes = np.rint(gpu.to_host(dev["wq"]) / gpu.to_host(dev["scale"])[0])
    np.testing.assert_array_equal(codes, np.rint(host["wq"] / host["scale"][0]))
    assert set(np.unique(codes)) <= {-1.0, 0.0, 1.0}
    dx, dw = dx0.copy(), dw0.copy()
    ddx, ddw = gpu.to_device(dx0), gpu.to_device(dw0)
    cpu.bitlinear_backward(dx, dw, dout, host["xq"], host["wq"])
    gpu.bitlinear_backward(ddx, ddw, gpu.to_device(dout), dev["xq"], dev["wq"])
    np.testing.assert_allclose(gpu.to_host(ddx), dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.to_host(ddw), dw, rtol=1e-5, atol=1e-6)


def test_bitnet_llama_step_on_cuda_matches_cpu():
    cfg = LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=11, block_size=8,
                      bitnet=True)
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, 11, (1, 4)), rng.integers(0, 11, (1, 4))
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        m = Llama(cfg, device=device, dtype=np.float64, seed=3)
        _, loss = m(idx, tgt)
        m.zero_grad()
        m.backward()
        losses.append(loss)
        grads.append(m.params.k.to_host(m.params.grad).copy())
    assert losses[1] == pytest.approx(losses[0], rel=1e-10)
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-8, atol=1e-10)
