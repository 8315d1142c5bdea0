"""Models built from nt ops."""
from .base import LanguageModel
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from . import gguf, hf
from .hf import from_pretrained
from .vit import ViT, ViTConfig

__all__ = ["LanguageModel", "GPT2", "GPT2Config", "Llama", "LlamaConfig", "from_gguf", "gguf", "from_pretrained",
           "hf", "ViT", "ViTConfig"]


def from_gguf(path, device: str = "cpu", keep_quantized: bool = False) -> LanguageModel:
    """A GPT2 or Llama-family model built from a llama.cpp GGUF file (gpt2, llama, qwen2,
    qwen3, gemma3, bitnet), weights dequantised to float32 (keep_quantized=True: a Llama's
    Q8_0/Q4_0/Q4_K/Q6_K matrices stay quantised -- on CUDA Q8_0/Q4_0 -- inference only), with the file's tokenizer as `model.tokenizer`. The file is
    checked whole before the model is built. See nt.models.gguf.load."""
    return gguf.load(path, device, keep_quantized)
