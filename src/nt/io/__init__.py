"""Reading and writing model weights, checkpoints and data."""
from .checkpoint import (Checkpoint, latest_checkpoint, load_checkpoint, load_model, load_weights,
                         save_checkpoint, save_run_checkpoint)
from .common import FormatError
from .llmc import (read_llmc_checkpoint, read_llmc_tokens, write_llmc_checkpoint,
                   write_llmc_tokens)
from .safetensors import load_safetensors, save_safetensors

__all__ = ["FormatError", "read_llmc_checkpoint", "write_llmc_checkpoint", "read_llmc_tokens",
           "write_llmc_tokens", "load_safetensors", "save_safetensors", "Checkpoint", "save_checkpoint",
           "load_checkpoint", "load_model", "load_weights", "save_run_checkpoint", "latest_checkpoint"]
