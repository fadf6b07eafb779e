"""Log-probabilities of given tokens under a model: what DPO and GRPO optimise.

    x (B, L) ids --model--> logits (B, L, V) --log_softmax--> log p(y_t | x_<=t), taken at the
    target y_t (B, L); positions whose target is -1 (prompt, padding) count as 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities (B, L) of targets y (B, L) after ids x (B, L); 0 where y < 0.
    Computed in fp32 whatever the model's dtype (a sum over many tokens loses bits in bf16)."""
    logits, _ = model(x)
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (y >= 0)


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the targets' log-probabilities (B,), number of targets (B,)) of each row."""
    return token_logps(model, x, y).sum(-1), (y >= 0).sum(-1)
