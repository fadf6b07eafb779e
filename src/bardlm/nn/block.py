"""The residual block: attention then feed-forward, each wrapped in a norm and a skip connection.

Pre-norm (GPT-2 onwards):  x = x + attn(norm(x));  x = x + ffn(norm(x))
Post-norm (2017 paper):    x = norm(x + attn(x));  x = norm(x + ffn(x))
Sandwich (Gemma 2/3):      x = x + norm'(attn(norm(x)));  x = x + norm'(ffn(norm(x)))
Output norm (OLMo 2):      x = x + norm(attn(x));  x = x + norm(ffn(x))
The skip connections give gradients a path around every layer, so deep stacks still train.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .cache import KVCache
from .deltanet import GatedDeltaNet
from .moe import make_ffn
from .norm import make_norm


class Block(nn.Module):
    """One transformer layer; with `cross=True` it also attends to an encoder output. `layer`
    (its index) picks a dense or mixture-of-experts FFN from `cfg.ffn_layers` and global, local
    (sliding-window) attention or a linear (gated delta rule) layer from `cfg.attn_layers`."""

    def __init__(self, cfg: ModelConfig, causal: bool = True, cross: bool = False, layer: int = 0) -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.residual = cfg.residual

        def norm() -> nn.Module:
            return make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias, cfg.fused_ops,
                             cfg.norm_unit_offset)

        self.ln_1 = norm()
        # A "linear" layer mixes tokens with the gated delta rule instead of softmax attention
        # (same call signature, a fixed-size state for a cache).
        linear = causal and cfg.attn_layers[layer] == "linear"
        self.attn = GatedDeltaNet(cfg, layer) if linear else Attention(cfg, causal=causal, layer=layer)
        if cross:
            self.ln_cross = norm()
            self.cross_attn = Attention(cfg, causal=False)
        else:
            self.ln_cross, self.cross_attn = None, None
        self.ln_2 = norm()
        self.mlp = make_ffn(cfg, layer)
        # Sandwich norms: each sublayer's output is normalised before it joins the stream.
        sandwich = cfg.norm_placement == "sandwich"
        self.ln_1_post = norm() if sandwich else None
        self.ln_2_post = norm() if sandwich else None

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn, post: nn.Module | None = None) -> torch.Tensor:  # noqa: ANN001
        skip = x if self.residual else 0.0  # residual=False: the ablation of docs/concepts.md
        if self.placement in ("pre", "sandwich"):
            out = fn(norm(x))
            return skip + (out if post is None else post(out))
        if self.placement == "output":  # the residual stream itself is never normalised
            return skip + norm(fn(x))
        return norm(skip + fn(x))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); memory (B, S, C) is the encoder output for cross-attention
        (or this layer's cached (k, v) of it, see `Attention.project_kv`)."""
        x = self._sublayer(x, self.ln_1, lambda h: self.attn(h, rope, mask, cache, start_pos),
                           self.ln_1_post)
        if self.cross_attn is not None and memory is not None:
            x = self._sublayer(
                x, self.ln_cross, lambda h: self.cross_attn(h, mask=memory_mask, kv_source=memory)
            )
        return self._sublayer(x, self.ln_2, self.mlp, self.ln_2_post)
