"""Models built from nt ops."""
from .base import LanguageModel
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig

__all__ = ["LanguageModel", "GPT2", "GPT2Config", "Llama", "LlamaConfig", "from_gguf"]


def from_gguf(path, device: str = "cpu") -> LanguageModel:
    """A GPT2 or Llama built from a llama.cpp GGUF file (architectures "gpt2", "llama"),
    weights dequantised to float32. See nt.io.gguf.load."""
    from ..io.gguf import load
    return load(path, device)
