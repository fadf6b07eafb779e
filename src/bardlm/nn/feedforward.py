"""Position-wise feed-forward networks: a GELU/ReLU MLP (GPT-2), SwiGLU (Llama, Qwen3),
GeGLU (Gemma: the same gated MLP with GELU in place of SiLU) and gpt-oss's clamped SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .dropout import Dropout


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3))))


def fused_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh` as one PyTorch kernel (the same function; a test holds them equal)."""
    return F.gelu(x, approximate="tanh")


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated unit, (..., F) and (..., F) -> (..., F):
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).

    The clamps bound the product (the gate only from above: a very negative gate is silenced by
    the sigmoid anyway); the + 1 lets a zero `up` pass the gate's value through unchanged."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


class MLP(nn.Module):
    """c_proj(act(c_fc(x))): widen to `hidden` (4x by default), apply the nonlinearity, narrow."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.act = gelu_tanh if cfg.ffn == "gelu" else F.relu
        if cfg.ffn == "gelu" and cfg.fused_ops:
            self.act = fused_gelu_tanh
        self.dropout = Dropout(cfg.resid_dropout, cfg.fast_dropout)  # before the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SwiGLU(nn.Module):
    """W2(silu(W1 x) * W3 x). W1 (gate) and W3 (up) are fused into one `c_fc` of 2*hidden rows,
    gate first, so decoding reads the input once. With cfg.ffn="geglu" the gate's nonlinearity
    is GELU (tanh approximation): W2(gelu(W1 x) * W3 x); with "swiglu_clamped" the gated unit is
    gpt-oss's `clamped_swiglu`."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None, dropout: bool = True) -> None:
        """hidden: the width (default ffn_hidden; an expert's is expert_hidden). dropout=False
        for a mixture's experts, whose sum is dropped once (nn/moe.py)."""
        super().__init__()
        self.hidden = hidden or cfg.ffn_hidden
        self.c_fc = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(self.hidden, cfg.n_embd, bias=cfg.bias)
        # before the residual add
        self.dropout = Dropout(cfg.resid_dropout if dropout else 0.0, cfg.fast_dropout)
        self.act = F.silu
        if cfg.ffn == "geglu":
            self.act = fused_gelu_tanh if cfg.fused_ops else gelu_tanh
        # (alpha, limit) of gpt-oss's clamped unit, or None for act(gate) * up
        self.clamp = (cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.ffn == "swiglu_clamped" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(self.unit(self.c_fc(x))))

    def unit(self, h: torch.Tensor) -> torch.Tensor:
        """The gated unit on c_fc's output: (..., 2*hidden) -> (..., hidden). (A mixture's
        stacked decode path applies it between its own matrix products: nn/moe.py.)"""
        gate, up = h.split(self.hidden, dim=-1)
        return self.act(gate) * up if self.clamp is None else clamped_swiglu(gate, up, *self.clamp)
