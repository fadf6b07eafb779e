"""A static key/value cache: preallocated once, filled in place.

Two ways to address it:
  * `start_pos` an int: the new keys go to positions start_pos.. and attention reads the filled
    prefix (its length grows step by step: the eager path).
  * `start_pos` a tensor of cache indices, (T,) shared by every row or (B, T) one per row: the
    keys are written with an index (`index_put_`) and attention reads the whole buffer, or
    the prefix of some rows that `KVCache.rows` (a `SlotView`) gives, under a mask (gpt-fast's
    recipe). No shape depends on how far decoding has got, so one step compiles once per read
    length (infer/budget.py `read_length` keeps those few), and rows of one batch can sit at
    different positions (continuous batching).

How long the buffers are, and how many rows, is decided outside the network, from the memory
available (infer/budget.py `plan_cache`).
"""

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
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D); return the keys/values to attend over (B, H_kv, S, D).

        start_pos int: write at start_pos..start_pos+T, return the prefix (S = start_pos + T).
        start_pos tensor (T,) or (B, T): cache indices; return the whole buffer (S = max_len).
        """
        if isinstance(start_pos, torch.Tensor):
            write_at(self.k, self.v, None, start_pos, k, v)
            return self.k, self.v
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

    def rows(self, rows: list[int], length: int) -> SlotView:
        """Buffer rows `rows`, reading their first `length` positions: a cache of their own
        for a static-shape step (see `SlotView`)."""
        return SlotView(self, rows, length)


def write_at(
    k_buf: torch.Tensor, v_buf: torch.Tensor, rows: torch.Tensor | None, pos: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor,
) -> None:
    """k_buf[rows[b], :, pos[b, t]] = k[b, :, t] (and v), in place.

    k_buf (N, H, S, D); k (B, H, T, D); rows (B,) buffer rows, None = rows 0..B-1 in order;
    pos (T,) shared by the rows or (B, T) per row.
    """
    B, _, T, _ = k.shape
    if rows is None and pos.dim() == 1:  # one position list for all rows: a plain index_copy
        k_buf[:B].index_copy_(2, pos, k.to(k_buf.dtype))
        v_buf[:B].index_copy_(2, pos, v.to(v_buf.dtype))
        return
    if rows is None:
        rows = torch.arange(B, device=k.device)
    r = rows.view(B, 1).expand(B, T)
    p = pos.expand(B, T)
    # Advanced indices on dims 0 and 2 put their (B, T) shape first: the values are (B, T, H, D).
    k_buf[r, :, p] = k.transpose(1, 2).to(k_buf.dtype)
    v_buf[r, :, p] = v.transpose(1, 2).to(v_buf.dtype)


class SlotView:
    """Some rows of a KVCache, seen as a cache of their own (a server's per-request slots).

    rows (B,): which buffer rows (slots) the batch's rows use; length: how many cache positions
    attention reads (enough for the furthest row). Writes go to (rows, positions); reads are
    the rows' first `length` positions: a view when the rows are consecutive, a gather otherwise.
    """

    def __init__(self, cache: KVCache, rows: list[int], length: int) -> None:
        self.cache, self.length = cache, length
        self.first = rows[0]
        self.consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.rows = torch.tensor(rows, device=cache.k.device)

    @property
    def max_len(self) -> int:
        return self.length

    def update(
        self, start_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H_kv, T, D) written at cache indices start_pos (T,) or (B, T) -> (B, H_kv, length, D)."""
        c = self.cache
        # Rows 0..B-1 in order need no row index: a plain index_copy when positions are shared.
        in_order = self.consecutive and self.first == 0
        write_at(c.k, c.v, None if in_order else self.rows, start_pos, k, v)
        if self.consecutive:
            end = self.first + len(self.rows)
            return c.k[self.first:end, :, :self.length], c.v[self.first:end, :, :self.length]
        return c.k[self.rows, :, :self.length], c.v[self.rows, :, :self.length]
