"""Positions: learned tables, sinusoidal tables and rotary embeddings (RoPE).

Every scheme is indexed by absolute position, so `start_pos` (the number of tokens already in the
KV cache) is all a caller needs to pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) table of "Attention Is All You Need":

    PE[p, 2i] = sin(p / 10000^(2i/dim)),  PE[p, 2i+1] = cos(p / 10000^(2i/dim)).
    """
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table.float()


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """(head_dim // 2,) inverse frequencies theta^(-2i/d), optionally rescaled.

    Llama 3.x ("llama3" scaling) divides low frequencies (long wavelengths) by `factor`, keeps
    high frequencies, and interpolates smoothly in between, so the model reaches long contexts
    without disturbing what it learnt about nearby tokens.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    if kind == "proportional":
        return _proportional_inv_freq(head_dim, theta, scaling)
    if kind != "llama3":
        from ..errors import BardlmError

        raise BardlmError(f"rope_scaling type {kind!r} is not supported; use 'llama3', 'yarn', "
                         "'linear' or 'proportional'")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()


def _proportional_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Gemma 4's "proportional" partial RoPE: only the first `partial_rotary_factor` of each
    head's channel pairs turn, at the frequencies they would have in a fully rotary head of
    `head_dim` (theta^(-2i/head_dim), not theta^(-2i/rotated)); the other pairs get frequency 0
    (cos 1, sin 0: left as they are). All divided by `factor` (default 1)."""
    rotated = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / head_dim))
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])
    return inv / float(scaling.get("factor", 1.0))


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (Peng et al. 2023; gpt-oss, Qwen long-context): frequencies that turn fewer than
    `beta_slow` times over the original context are divided by `factor` (interpolated), those
    that turn more than `beta_fast` times are kept (extrapolated), with a linear ramp between,
    over channel pairs. (The cos/sin are also scaled: `rope_attention_factor`.)"""
    from ..errors import BardlmError

    if not scaling.get("factor") or not scaling.get("original_max_position_embeddings"):
        raise BardlmError("yarn rope_scaling needs 'factor' and 'original_max_position_embeddings'")
    factor, old_len = float(scaling["factor"]), scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def pair_index(rotations: float) -> float:
        """The channel pair whose wavelength fits `rotations` times in the original context."""
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    keep = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (its "mscale", 0.1 ln(factor) + 1 by default):
    it sharpens attention at the longer context. 1.0 for every other scaling."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return yarn_mscale(factor, scaling["mscale"]) / yarn_mscale(factor, scaling["mscale_all_dim"])
    return yarn_mscale(factor)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's mscale (eq. 21 of the paper): 0.1 m ln(factor) + 1, and 1 without stretching."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (..., head_dim), for integer `positions` (...,), computed in fp32.

    Channels are paired as (i, i + d/2) ("rotate half", the Hugging Face layout of Llama and
    Qwen3 checkpoints), so both halves of the last dim hold the same angles.
    """
    angles = positions.float().unsqueeze(-1) * inv_freq.float()  # (..., d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., d)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k: x (B, H, T, D) with cos/sin (T, R) or (B, 1, T, R) -> (B, H, T, D).

    R < D (partial rotary, Qwen3.5): the first R channels of each head are rotated (pairs i,
    i + R/2 among them) and the other D - R pass unchanged."""
    if cos.shape[-1] < x.shape[-1]:
        R = cos.shape[-1]
        return torch.cat([apply_rope(x[..., :R], cos, sin), x[..., R:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
