"""bardlm: decoder-only transformer language models from scratch in PyTorch."""

from .config import PRESETS, ModelConfig, preset
from .errors import BardlmError
from .hf import from_pretrained
from .model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "PRESETS", "preset", "BardlmError", "__version__", "from_pretrained"]
