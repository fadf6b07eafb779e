"""The gated short convolution (LFM2; Liquid AI, 2025): a token mixer with a state of a few inputs.

Most of an LFM2 model's layers mix tokens not with attention but with a causal depthwise
convolution of a short kernel (3), gated on both sides by the input itself:

    B, C, h = split(W_in x)              three n_embd-wide projections of the same token
    u_t     = B_t * h_t                  input gate (elementwise)
    y_t     = sum_j w_j * u_{t-K+1+j}    causal depthwise conv over the last K tokens (per channel)
    out_t   = W_out (C_t * y_t)          output gate, then the output projection

No activation, no positions (order comes from the conv), and each token sees only the K - 1
tokens before it directly: longer-range mixing is left to the few attention layers between
(GQA with QK-norm: nn/attention.py). Decoding keeps the last K - 1 inputs u per row, the
conv-only form of `StateCache` (nn/cache.py): 2 x n_embd values per layer at any length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .cache import StateCache
from .deltanet import causal_conv, padding_free
from .dropout import Dropout


class ShortConv(nn.Module):
    """LFM2's short-convolution layer (transformers' `Lfm2ShortConv`); x (B, T, C) -> (B, T, C).

    `c_in` (3C, C) projects x into rows [B | C | h] (transformers' in_proj, same order);
    `conv_weight` (C, 1, kernel) is the depthwise conv (`linear_conv_kernel`, LFM2's
    conv_L_cache); `c_proj` (C, C) is out_proj. No biases (LFM2's conv_bias=false).
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.kernel = cfg.linear_conv_kernel
        self.c_in = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(cfg.n_embd, 1, self.kernel))
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_dropout = Dropout(cfg.resid_dropout, cfg.fast_dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv_weight.copy_(self.initial("conv_weight"))

    def initial(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The initial value of parameter `name` (only conv_weight is this module's own), whole,
        on the CPU: PyTorch's Conv1d default, uniform within 1/sqrt(kernel) (fan-in of a
        depthwise channel), as transformers initialises it."""
        bound = 1 / math.sqrt(self.kernel)
        return torch.empty(self.conv_weight.shape).uniform_(-bound, bound, generator=generator)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: StateCache | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); Attention's signature (rope is unused: no positions here).

        mask: the attention mask (B, 1, T, S) of a left-padded batch: padding tokens enter the
              conv as zeros (as a sequence's start does), so they change nothing.
        cache: the layer's conv-only `StateCache` (or a view of some of its rows): the last
              kernel - 1 gated inputs, read before and written after this pass; a row whose
              first token is at cache index 0 starts from zeros.
        """
        B, T, _ = x.shape
        real = padding_free(mask, start_pos, T)  # (B, T) bool or None
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        b, c, h = self.c_in(x).chunk(3, dim=-1)  # each (B, T, C)
        conv_state = None if cache is None else cache.read(start_pos, B)[0]
        y, conv_state = causal_conv(b * h, self.conv_weight, conv_state)
        if cache is not None:
            cache.write(conv_state, None, start_pos)  # a parked dummy token keeps the state
        return self.resid_dropout(self.c_proj(c * y))


__all__ = ["ShortConv"]
