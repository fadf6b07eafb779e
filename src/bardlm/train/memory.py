"""The memory of a training step: switches that lower it, and the peak it reaches.

`configure` puts a run's memory switches on its model: activation checkpointing (every k-th
block keeps only its input and runs again in backward) and the chunked loss (nn/loss.py).
"""

from __future__ import annotations

from torch import nn

from ..config import TrainConfig


def configure(model: nn.Module, cfg: TrainConfig) -> None:
    """Set `cfg`'s activation checkpointing and loss chunking on a `GPT` (other models: no-op)."""
    if hasattr(model, "checkpoint_every"):
        model.checkpoint_every = cfg.checkpoint_every if cfg.checkpoint_activations else 0
    if hasattr(model, "loss_chunk"):
        model.loss_chunk = cfg.loss_chunk
