"""Reading and writing model weights, checkpoints and data.

Every reader treats its file as hostile: sizes are checked against the file before
anything is allocated, and anything malformed is a FormatError naming the file. This
package does not import nt.models at module level (the models import it); functions that
build a model import them inside.
"""
from .checkpoint import (Checkpoint, latest_checkpoint, load_checkpoint, load_model, load_weights, resolve_checkpoint,
                         save_checkpoint, save_run_checkpoint)
from .common import FormatError
from .llmc import (LlmcSizes, read_llmc_checkpoint, read_llmc_tokens, write_llmc_checkpoint,
                   write_llmc_tokens)
from .safetensors import load_safetensors, read_safetensors_header, save_safetensors

__all__ = ["FormatError", "LlmcSizes", "read_llmc_checkpoint", "write_llmc_checkpoint", "read_llmc_tokens",
           "write_llmc_tokens", "load_safetensors", "read_safetensors_header", "save_safetensors", "Checkpoint",
           "save_checkpoint", "load_checkpoint", "load_model", "load_weights", "save_run_checkpoint",
           "latest_checkpoint", "resolve_checkpoint"]
