"""The residual block: attention then feed-forward, each wrapped in a norm and a skip connection.

Pre-norm (GPT-2 onwards):  x = x + attn(norm(x));  x = x + ffn(norm(x))
Post-norm (2017 paper):    x = norm(x + attn(x));  x = norm(x + ffn(x))
Sandwich (Gemma 2/3):      x = x + norm'(attn(norm(x)));  x = x + norm'(ffn(norm(x)))
Output norm (OLMo 2):      x = x + norm(attn(x));  x = x + norm(ffn(x))
The skip connections give gradients a path around every layer, so deep stacks still train.

Gemma 4 adds, each by a config field: a mixture of experts beside the dense MLP
("dense+moe" in `ffn_layers`: x + norm'(norm_a(mlp(norm(x))) + norm_b(moe(norm_c(x), route=x)))),
a per-layer input gated into the stream after the FFN
(x + norm(W_up(gelu(W_gate x) * per_layer_input))), and a learned scalar on the layer's output.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .cache import KVCache
from .deltanet import GatedDeltaNet
from .feedforward import fused_gelu_tanh, gelu_tanh
from .mla import LatentAttention
from .moe import MoE, make_ffn
from .norm import make_norm
from .shortconv import ShortConv


class Block(nn.Module):
    """One transformer layer; with `cross=True` it also attends to an encoder output. `layer`
    (its index) picks a dense or mixture-of-experts FFN from `cfg.ffn_layers` and global, local
    (sliding-window) attention, a linear (gated delta rule) layer or a short convolution
    (LFM2) from `cfg.attn_layers`;
    `cfg.attn_type` picks per-head attention or latent attention (nn/mla.py)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True, cross: bool = False, layer: int = 0) -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.residual = cfg.residual

        def norm() -> nn.Module:
            return make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias, cfg.fused_ops,
                             cfg.norm_unit_offset)

        self.ln_1 = norm()
        # DeepSeek's latent attention (causal self-attention only), a "linear" layer mixing tokens
        # with the gated delta rule instead of softmax attention (same call signature, a
        # fixed-size state for a cache), or the per-head kind.
        if cfg.attn_type == "mla" and causal:
            self.attn = LatentAttention(cfg)
        elif causal and cfg.attn_layers[layer] == "linear":
            self.attn = GatedDeltaNet(cfg, layer)
        elif causal and cfg.attn_layers[layer] == "conv":  # LFM2's gated short convolution
            self.attn = ShortConv(cfg, layer)
        else:
            self.attn = Attention(cfg, causal=causal, layer=layer)
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
        # Gemma 4's MoE beside the dense MLP: each branch has its own output norm, the experts
        # their own input norm (the router reads the un-normalised stream).
        if cfg.ffn_layers[layer] == "dense+moe":
            self.moe, self.ln_mlp_post, self.ln_moe, self.ln_moe_post = MoE(cfg), norm(), norm(), norm()
        else:
            self.moe, self.ln_mlp_post, self.ln_moe, self.ln_moe_post = None, None, None, None
        # Gemma 4's per-layer input (PLE): a gate from the stream times this layer's input vector.
        if cfg.per_layer_input_dim:
            self.ple_gate = nn.Linear(cfg.n_embd, cfg.per_layer_input_dim, bias=False)
            self.ple_proj = nn.Linear(cfg.per_layer_input_dim, cfg.n_embd, bias=False)
            self.ln_ple = norm()
            self.ple_act = fused_gelu_tanh if cfg.fused_ops else gelu_tanh
        else:
            self.ple_gate, self.ple_proj, self.ln_ple = None, None, None
        self.layer_scalar = nn.Parameter(torch.ones(1)) if cfg.layer_scalar else None

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
        per_layer_input: torch.Tensor | None = None,
        shared_kv: dict[str, tuple] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); memory (B, S, C) is the encoder output for cross-attention
        (or this layer's cached (k, v) of it, see `Attention.project_kv`). per_layer_input
        (B, T, P): this layer's Gemma 4 input; shared_kv: the pass's shared keys and values
        (`Attention.forward`)."""
        # (KV sharing is Gemma 4's; latent attention and linear layers have none.)
        share = {"shared_kv": shared_kv} if isinstance(self.attn, Attention) else {}
        x = self._sublayer(x, self.ln_1, lambda h: self.attn(h, rope, mask, cache, start_pos, **share),
                           self.ln_1_post)
        if self.cross_attn is not None and memory is not None:
            x = self._sublayer(
                x, self.ln_cross, lambda h: self.cross_attn(h, mask=memory_mask, kv_source=memory)
            )
        if self.moe is None:
            x = self._sublayer(x, self.ln_2, self.mlp, self.ln_2_post)
        else:  # dense+moe: sandwich placement (config-checked), the two branches summed
            dense = self.ln_mlp_post(self.mlp(self.ln_2(x)))
            experts = self.ln_moe_post(self.moe(self.ln_moe(x), route=x))
            x = x + self.ln_2_post(dense + experts)
        if self.ple_gate is not None:
            gated = self.ple_act(self.ple_gate(x)) * per_layer_input
            x = x + self.ln_ple(self.ple_proj(gated))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x
