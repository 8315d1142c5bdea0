"""Every format a model can leave nt in brings it back with the same logits: a Hugging Face
folder -> nt -> GGUF (with its tokenizer) -> nt -> Hugging Face folder -> nt, and a fixture
folder fine-tuned with the training loop and saved back as a folder transformers reads."""
from pathlib import Path

import numpy as np
import pytest

import nt
from nt.models import from_gguf, from_pretrained
from helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hf" / "models"


# the llama fixture has Llama 3's RoPE scaling, which nt does not write to GGUF (refused, tested in tests/io)
@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma3_text"])
def test_hf_to_gguf_to_hf_keeps_the_logits(arch, tmp_path):
    ids, want = np.load(FIXTURES / arch / "input_ids.npy"), np.load(FIXTURES / arch / "logits.npy")
    model = from_pretrained(FIXTURES / arch)
    tok = nt.tokenizer.from_pretrained(FIXTURES / arch)
    nt.models.gguf.write(tmp_path / "m.gguf", model, "F32", tokenizer=tok)
    from_file = from_gguf(tmp_path / "m.gguf")
    np.testing.assert_allclose(from_file(ids)[0], want, atol=1e-4)          # transformers' logits
    from_file.save_pretrained(tmp_path / "hf")
    again = from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(again(ids)[0], from_file(ids)[0], atol=1e-5)
    text = "def add(a, b): return a + b  # 42"
    assert from_file.tokenizer.encode(text) == tok.encode(text)             # the tokenizer came along


def test_a_fixture_folder_fine_tunes_and_saves_back(tmp_path):
    """The acceptance path of a user with a Hugging Face folder: LoRA fine-tuning on chats
    with the shared loop, merged and saved as a folder that nt (and transformers) load."""
    finetune = load_script("train/finetune.py", "finetune")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(f'{{"messages": [{{"role": "user", "content": "{q}?"}}, '
                             f'{{"role": "assistant", "content": "{a}."}}]}}\n'
                             for q, a in [("hi", "hello"), ("bye", "see you"), ("two", "2"), ("yes", "no")] * 10))
    out = tmp_path / "sft"
    finetune.main(["--base", str(FIXTURES / "llama"), "--data", str(chats), "--out-dir", str(out), "--steps", "3",
                   "-B", "2", "-T", "48", "--eval-every", "0", "--sample-tokens", "0", "--lora-rank", "4",
                   "--lr", "1e-2", "--merge"])
    merged = from_pretrained(out / "hf")
    ids = np.load(FIXTURES / "llama" / "input_ids.npy")
    base = from_pretrained(FIXTURES / "llama")
    assert np.isfinite(merged(ids)[0]).all()
    assert not np.allclose(merged(ids)[0], base(ids)[0], atol=1e-7)        # the fine-tuning reached the weights
    assert nt.tokenizer.from_pretrained(out / "hf").chat_template            # the chat template travels with it
