"""A static key/value cache: preallocated once, filled in place, indexed by `start_pos`."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer for positions already seen.

    Buffers are (B, n_kv_head, max_len, head_dim): grouped-query attention stores only its KV
    heads, so a GQA model's cache is n_kv_head / n_head the size of the MHA one.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at start_pos; return all keys/values so far (B, H_kv, S, D)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            from ..errors import BardlmError

            raise BardlmError(
                f"KV cache holds {self.max_len} positions but {end} were needed; "
                "make the cache longer or crop the context"
            )
        self.k[:, :, start_pos:end] = k.to(self.k.dtype)
        self.v[:, :, start_pos:end] = v.to(self.v.dtype)
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
