"""bardlm: decoder-only transformer language models from scratch in PyTorch."""

from .config import PRESETS, ModelConfig, TrainConfig, preset
from .errors import BardlmError
from .io.hf import from_pretrained
from .io.load import load
from .nn.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "TrainConfig", "PRESETS", "preset", "load", "BardlmError",
           "__version__", "from_pretrained"]
