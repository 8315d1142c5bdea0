"""Reading and writing model weights and data."""
from .llmc import (FormatError, read_llmc_checkpoint, read_llmc_tokens, write_llmc_checkpoint,
                   write_llmc_tokens)

__all__ = ["FormatError", "read_llmc_checkpoint", "write_llmc_checkpoint", "read_llmc_tokens",
           "write_llmc_tokens"]
