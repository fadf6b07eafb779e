"""Normalisation layers, written out (no `nn.LayerNorm` inside).

Each one also has a `fused` switch that computes the same function with PyTorch's single kernel
(`F.layer_norm`, `F.rms_norm`): the written-out version is ~8 elementwise passes over the
activations, which dominates a CPU training step of a small model. Tests hold the two equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dim.

    The variance is the biased one (divide by C, not C - 1), as in the paper and `nn.LayerNorm`.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, fused: bool = False) -> None:
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        dtype = x.dtype
        if self.fused:  # one kernel; fp32 statistics (autocast runs layer_norm in fp32 too)
            w, b = self.weight.float(), None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), x.shape[-1:], w, b, self.eps).to(dtype)
        x = x.float()  # statistics in fp32 even under bf16 autocast
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or shift (Llama).

    unit_offset (Gemma): y = x / sqrt(mean(x^2) + eps) * (1 + weight), the weight starting at
    0, the whole product in fp32 before the cast back (Gemma's order of operations).

    scale=False: no weight at all, y = x / sqrt(mean(x^2) + eps) (Gemma 4's norm on values and
    in its router)."""

    def __init__(self, dim: int, eps: float = 1e-6, fused: bool = False, unit_offset: bool = False,
                 scale: bool = True) -> None:
        super().__init__()
        self.eps, self.fused, self.unit_offset = eps, fused, unit_offset
        self.weight = nn.Parameter(torch.full((dim,), self.initial_value)) if scale else None

    @property
    def initial_value(self) -> float:
        """The weight's initial value: the scale 1 either way."""
        return 0.0 if self.unit_offset else 1.0

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, self.initial_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        dtype = x.dtype
        x = x.float()
        if self.fused:
            y = F.rms_norm(x, x.shape[-1:], None, self.eps)
        else:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return y.to(dtype)
        if self.unit_offset:
            return (y * (1.0 + self.weight.float())).to(dtype)
        # HF Llama/Qwen3 cast back before the scale; we do the same for bit-level parity.
        return self.weight * y.to(dtype) if dtype != torch.float32 else self.weight * y


def make_norm(kind: str, dim: int, eps: float, bias: bool = True, fused: bool = False,
              unit_offset: bool = False) -> nn.Module:
    """The norm a config names: "layernorm", "rmsnorm" or "none" (identity, for ablations);
    unit_offset: Gemma's (1 + w) RMSNorm."""
    if kind == "none":
        return nn.Identity()
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias, fused)
    return RMSNorm(dim, eps, fused, unit_offset)
