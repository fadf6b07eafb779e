"""Multi-head latent attention (MLA, DeepSeek-V2 and V3): the cache holds one small latent per
token instead of a key and a value per head.

With C = n_embd, H heads, r = kv_lora_rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim,
dv = v_head_dim:

    q            = q_b(norm(q_a(x)))  or  q_proj(x)        (B, T, H, dn + dr)  low-rank or full
    q_nope, q_r  = split(q)                                 (.., dn), (.., dr)
    c, k_r       = split(kv_a(x));  c = norm(c)             (B, T, r), (B, T, dr)   <- cached
    k_nope, v    = split(kv_b(c))                           (B, S, H, dn), (B, S, H, dv)
    q_r, k_r     = RoPE(q_r), RoPE(k_r)                     k_r is one key shared by all heads
    scores       = (q_nope . k_nope + q_r . k_r) * scale    scale = 1/sqrt(dn + dr) [* mscale^2]
    y            = c_proj(softmax(scores) v)

The cache (nn/cache.py `LatentCache`) stores c and the rotated k_r: r + dr values per token and
layer (576 in DeepSeek-V3) where a 128-head MHA layer would store 2 x 128 x 128.

Two ways to attend over the cached latents, equal up to rounding (a test holds them equal):
* **expanded** (prefill, training): k_nope and v are made for every key from its latent, then
  ordinary attention with H heads.
* **absorbed** (decoding): kv_b's rows for head h are W_uk[h] (dn, r) and W_uv[h] (dv, r), and
  q_nope . (W_uk[h] c) = (W_uk[h]^T q_nope) . c, so the query is mapped into the latent space once
  and attends over the latents themselves (an MQA with one key/value "head" of width r + dr);
  the output latent is mapped out by W_uv[h]. No key or value is ever expanded: a decode step
  reads r + dr values per cached token.

DeepSeek's checkpoints pair RoPE channels (2i, 2i+1) (`rope_interleave`); we gather them into
the (i, i + dr/2) layout `position.apply_rope` rotates, for q and k alike (q.k is unchanged by the
same permutation of both), as transformers does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .attention import attend, causal_layout
from .cache import LatentCache
from .dropout import Dropout
from .norm import RMSNorm
from .position import apply_rope, yarn_mscale

# transformers' DeepSeek-V3 builds its two latent norms with eps 1e-6, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times mscale(factor, mscale_all_dim)^2 under
    YaRN scaling: DeepSeek sharpens every channel's logits at the stretched context, not only
    the rotary ones (which the cos/sin factor scales)."""
    scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(.., d) with channel pairs (2i, 2i+1) -> (.., d) with pairs (i, i + d/2)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def linear_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) matrix a linear layer applies, whatever it was swapped for: an nn.Linear, an
    INT8 layer (dequantized), the transposed fp32 layout (FastLinear), a LoRA adapter (its base
    plus B A) or int4. The absorbed form needs the matrix itself, not only its product with x."""
    if hasattr(module, "delta"):  # LoRALinear
        return linear_weight(module.base, dtype) + module.delta().to(dtype)
    if hasattr(module, "dequantized"):  # Int8Linear, int4
        return module.dequantized(dtype)
    if hasattr(module, "weight_t"):  # FastLinear
        return module.weight_t.t().to(dtype)
    if isinstance(module, nn.Linear):
        return module.weight.to(dtype)
    # Any other layer (int4's packed codes): its matrix is its output on the identity (kv_b,
    # the one layer read this way, has no bias).
    device = next(module.buffers()).device
    return module(torch.eye(module.in_features, dtype=dtype, device=device)).t().to(dtype)


class LatentAttention(nn.Module):
    """Causal multi-head latent attention; x (B, T, C) -> (B, T, C). See the module docstring.

    `absorb`: "auto" (absorbed when decoding one token per row, expanded otherwise), "always"
    or "never": the same function, chosen for speed (tests run both).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, H = cfg.n_embd, cfg.n_head
        self.n_head, self.rank = H, cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope_dim
        self.q_low_rank = cfg.q_lora_rank is not None
        if not self.q_low_rank:
            self.q_proj = nn.Linear(C, H * qk, bias=False)
        else:  # low-rank queries: C -> q_lora_rank (normed) -> H heads
            self.q_a_proj = nn.Linear(C, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, cfg.fused_ops)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        # One projection makes the latent and the shared RoPE key: rows [latent | rope key].
        self.kv_a_proj = nn.Linear(C, self.rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = RMSNorm(self.rank, LATENT_NORM_EPS, cfg.fused_ops)
        # Up-projection of a latent: per head, rows [k_nope (dn) | v (dv)].
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.c_proj = nn.Linear(H * self.v_dim, C, bias=cfg.attn_bias)
        self.interleave = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        self.dropout, self.fast_dropout = cfg.attn_dropout, cfg.fast_dropout
        self.resid_dropout = Dropout(cfg.resid_dropout, cfg.fast_dropout)
        self.impl = cfg.attn_impl
        self.absorb = "auto"

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> q (B, H, T, dn + dr)."""
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_low_rank else self.q_proj(x)
        return q.view(*x.shape[:2], self.n_head, -1).transpose(1, 2)

    def _rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """RoPE on the rotary channels x (B, H or 1, T, dr), in DeepSeek's pairing if interleaved."""
        return apply_rope(deinterleave(x) if self.interleave else x, *rope)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); rope, mask, cache and start_pos as in `Attention.forward`
        (rope: cos/sin over the qk_rope_head_dim rotary channels)."""
        B, T, _ = x.shape
        q_nope, q_rot = self._query(x).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_a_norm(latent).unsqueeze(1)  # (B, 1, T, r): one "head" for every head
        q_rot, k_rot = self._rotate(q_rot, rope), self._rotate(k_rot.unsqueeze(1), rope)
        k_pos = None
        if cache is not None:  # stores and returns latents and RoPE keys: (B, 1, S, r), (B, 1, S, dr)
            latent, k_rot, k_pos = cache.update(start_pos, latent, k_rot)
        mask, is_causal = causal_layout(mask, T, latent.shape[2], start_pos, k_pos, x.device)
        absorbed = self.absorb == "always" or (self.absorb == "auto" and T == 1 and cache is not None)
        attend_form = self._absorbed if absorbed else self._expanded
        y = attend_form(q_nope, q_rot, latent, k_rot, mask, is_causal)  # (B, H, T, dv)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        p_drop = self.dropout if self.training else 0.0
        return attend(q, k, v, mask, is_causal, self.scale, self.impl, p_drop, self.fast_dropout)

    def _expanded(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor,
                  k_rot: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """Keys and values made from every latent: q (B, H, T, dn/dr), latent (B, 1, S, r), k_rot
        (B, 1, S, dr) -> (B, H, T, dv)."""
        B, _, S, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(B, S, self.n_head, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
        k = torch.cat([k_nope, k_rot.expand(B, self.n_head, S, self.rope_dim)], dim=-1)
        return self._attend(torch.cat([q_nope, q_rot], dim=-1), k, v, mask, is_causal)

    def _absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor,
                  k_rot: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """kv_b absorbed into the query and the output: attention over the latents themselves."""
        w = linear_weight(self.kv_b_proj, q_nope.dtype).view(self.n_head, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # (H, dn, r), (H, dv, r)
        q_latent = q_nope @ w_uk  # (B, H, T, dn) @ (H, dn, r) -> (B, H, T, r)
        q = torch.cat([q_latent, q_rot], dim=-1)  # (B, H, T, r + dr)
        k = torch.cat([latent, k_rot.to(latent.dtype)], dim=-1)  # (B, 1, S, r + dr)
        out_latent = self._attend(q, k, latent, mask, is_causal)  # (B, H, T, r)
        return out_latent @ w_uv.transpose(1, 2)  # (B, H, T, r) @ (H, r, dv) -> (B, H, T, dv)


__all__ = ["LatentAttention", "LatentCache", "linear_weight", "softmax_scale"]
