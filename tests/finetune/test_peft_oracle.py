"""PEFT as the oracle (slow; needs torch, transformers and peft): nt trains LoRA adapters
for a few steps on a tiny Llama and a tiny GPT-2, saves the base with save_pretrained and
the adapters with LoRA.save; transformers + peft.PeftModel.from_pretrained load both and
must compute nt's logits (fp32, 1e-4)."""
import numpy as np
import pytest

from nt.lora import LoRA, targets_of
from nt.models import GPT2, GPT2Config, Llama, LlamaConfig
from nt.optim import AdamW

TOL = 1e-4


def tiny(arch):
    if arch == "gpt2":
        return GPT2(GPT2Config(block_size=32, vocab_size=300, n_layer=2, n_head=4, n_embd=64), seed=1)
    return Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=300,
                             block_size=32, tie_embeddings=False), seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_nt_adapters_and_computes_nt_logits(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny(arch)
    model.save_pretrained(tmp_path / "base")
    lora = LoRA(model, rank=4, alpha=8, targets=list(targets_of(model)))
    opt = AdamW(lora.params, lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(3):   # B moves away from zero, so the adapters change the logits
        idx = rng.integers(0, 300, (2, 16), dtype=np.int32)
        model.zero_grad()
        model.forward(idx, np.roll(idx, -1, axis=1))
        model.backward()
        opt.step()
    lora.save(tmp_path / "adapter")
    ids = rng.integers(0, 300, (2, 12), dtype=np.int32)
    ours = model(ids)[0].copy()
    with lora.disabled():
        assert np.abs(model(ids)[0] - ours).max() > 1e-3

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager",
                                                             dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)
