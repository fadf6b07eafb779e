"""Log-probabilities of given tokens under a model: what DPO and GRPO optimise.

    x (B, L) ids --model--> per-token losses -log p(y_t | x_<=t) at the targets y_t (B, L);
    positions whose target is -1 (prompt, padding) count as 0.

The model computes them itself (`loss_reduction="none"`), so a model with `loss_chunk` set never
holds the (B, L, V) logits (nn/loss.py).
"""

from __future__ import annotations

import torch


def token_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities (B, L) of targets y (B, L) after ids x (B, L); 0 where y < 0.
    Computed in fp32 whatever the model's dtype (a sum over many tokens loses bits in bf16)."""
    _, nll = model(x, y, loss_reduction="none")
    return -nll


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the targets' log-probabilities (B,), number of targets (B,)) of each row."""
    return token_logps(model, x, y).sum(-1), (y >= 0).sum(-1)
