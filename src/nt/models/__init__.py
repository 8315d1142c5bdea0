"""Models built from nt ops."""
from .base import LanguageModel
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig

__all__ = ["LanguageModel", "GPT2", "GPT2Config", "Llama", "LlamaConfig"]
