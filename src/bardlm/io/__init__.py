"""File formats: atomic writes, bardlm checkpoints, Hugging Face directories, and `load`."""

from .checkpoint import load_checkpoint, save_checkpoint, save_tokenizer
from .hf import convert, from_pretrained, save_pretrained
from .load import load

__all__ = ["convert", "from_pretrained", "load", "load_checkpoint", "save_checkpoint",
           "save_pretrained", "save_tokenizer"]
