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

A latent-attention layer (nn/mla.py) keeps a `LatentCache`: the same buffers, holding per position
the compressed latent in place of keys and the shared RoPE key in place of values (one "head").

A sliding-window layer keeps a `RingKVCache`: the last `window` positions of each row and
nothing older, whatever the context. Every cache's `update` returns the keys and values to attend
over and the cache index of each key (None when key j is cache index j), from which attention
builds its mask (`attention.attention_mask`).

A linear-attention layer (nn/deltanet.py) keeps a `StateCache`: no keys or values, but a fixed
state per row (its conv's last inputs and the delta rule's matrices), read before a pass and
written after it. It is addressed by the same `start_pos` (int or tensor) and gives the same
`rows` views; a row whose pass starts at cache index 0 starts from zeros (a new sequence, or a
server slot's new request), so it never needs clearing. A state is a sum over every token seen,
so nothing may enter it that is not the row's own next token: a pass must be unpadded (the
server reads prompts of different lengths in separate passes, serve/engine.py), and a row whose
last index is max_len - 1, where the server parks an idle slot's dummy token, keeps its state
(that index is never followed by a token to read it). A short-convolution layer
(nn/shortconv.py, LFM2) keeps the conv-only form of the same class: its last inputs, no matrices.
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
        v_dim: int | None = None,
    ) -> None:
        """v_dim: the width of the second buffer when it differs from head_dim (`LatentCache`)."""
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        v_shape = (batch, n_kv_head, max_len, v_dim or head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Write k, v (B, H_kv, T, D); return the keys/values to attend over (B, H_kv, S, D)
        and None (key j is cache index j).

        start_pos int: write at start_pos..start_pos+T, return the prefix (S = start_pos + T).
        start_pos tensor (T,) or (B, T): cache indices; return the whole buffer (S = max_len).
        """
        if isinstance(start_pos, torch.Tensor):
            write_at(self.k, self.v, None, start_pos, k, v)
            return self.k, self.v, None
        end = start_pos + k.shape[2]
        _check_room(end, self.max_len)
        self.k[:, :, start_pos:end] = k.to(self.k.dtype)
        self.v[:, :, start_pos:end] = v.to(self.v.dtype)
        return self.k[:, :, :end], self.v[:, :, :end], None

    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def rows(self, rows: list[int], length: int) -> SlotView:
        """Buffer rows `rows`, reading their first `length` positions: a cache of their own
        for a static-shape step (see `SlotView`)."""
        return SlotView(self, rows, length)


class LatentCache(KVCache):
    """The cache of a latent-attention layer (DeepSeek's MLA): per position only the normalised
    latent (kv_lora_rank values) and the rotated RoPE key shared by every head
    (qk_rope_head_dim), never per-head keys and values: `k` is (B, 1, max_len, kv_lora_rank) and
    `v` (B, 1, max_len, qk_rope_head_dim). `update(start_pos, latent, rope_key)` writes and returns
    them as `KVCache.update` does keys and values (both addressing modes, `rows` slot views), and
    attention expands or absorbs the latent itself (nn/mla.py)."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(batch, max_len, 1, kv_lora_rank, dtype, device, v_dim=rope_dim)


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
        self.cache, self.length, self.n = cache, length, len(rows)
        self.first = rows[0]
        self.consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        # A row index tensor only where one is read: building it is a host-to-device copy, and
        # on a GPU every such copy waits for the queued kernels (12 layers: 12 waits a token).
        self.rows = None if self.consecutive else torch.tensor(rows, device=cache.k.device)

    @property
    def max_len(self) -> int:
        return self.length

    def update(
        self, start_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """k, v (B, H_kv, T, D) written at cache indices start_pos (T,) or (B, T) -> keys and
        values (B, H_kv, length, D), None (key j is cache index j)."""
        c = self.cache
        # Rows 0..B-1 in order need no row index: a plain index_copy when positions are shared.
        rows = self.rows
        if self.consecutive and self.first != 0:
            rows = torch.arange(self.first, self.first + self.n, device=c.k.device)
        write_at(c.k, c.v, rows, start_pos, k, v)
        if self.consecutive:
            end = self.first + self.n
            return c.k[self.first:end, :, :self.length], c.v[self.first:end, :, :self.length], None
        return c.k[self.rows, :, :self.length], c.v[self.rows, :, :self.length], None


def _check_room(end: int, max_len: int) -> None:
    if end > max_len:
        from ..errors import BardlmError

        raise BardlmError(
            f"KV cache holds {max_len} positions but {end} were needed; "
            "make the cache longer or crop the context"
        )


class RingKVCache(nn.Module):
    """Keys and values of a sliding-window layer: the last `window` positions of each row.

    A query at cache index q reads keys q - window + 1 .. q, so older keys are never read again
    and the buffers (B, n_kv_head, window, head_dim) hold cache index p in slot p % window, with
    `pos` (B, window) saying which index each slot holds (-1: none yet). The cache serves
    sequences of up to `max_len` positions (the linear caches' length), in `window` slots.

    `update` attends over the slots as they were plus the new keys (so a chunk longer than the
    window still sees its own earlier keys), then keeps the last `window` new ones. Two rules
    make a slot reused by the server (a new request in an old row) safe without clearing it:
    a slot holding an index at or past the row's first new one is stale (an earlier request's)
    and hidden; and cache index max_len - 1, where the server parks a chunk's padding
    (serve/engine.py), is never kept (no later query exists to read it).
    """

    def __init__(
        self,
        batch: int,
        window: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.window, self._max_len = window, max_len
        shape = (batch, n_kv_head, window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch, window), -1, dtype=torch.long, device=device),
                             persistent=False)

    @property
    def max_len(self) -> int:
        """The positions a sequence may span (not the slots held: `window`)."""
        return self._max_len

    def nbytes(self) -> int:
        """Bytes of keys and values (the (B, window) index table aside)."""
        return self.k.numel() * self.k.element_size() * 2

    def rows(self, rows: list[int], length: int) -> RingSlotView:
        """Buffer rows `rows` as a cache of their own (`length` is the linear caches' read
        length; a ring always reads its `window` slots)."""
        return RingSlotView(self, rows)

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at cache indices start_pos.. (int) or start_pos (T,) or
        (B, T); rows (B,): buffer rows, None = 0..B-1. Returns the keys and values to attend
        over (B, H_kv, S, D) and their cache indices, (S,) or (B, S)."""
        if isinstance(start_pos, int):
            return self._update_eager(start_pos, k, v)
        B, H, T, D = k.shape
        W = self.window
        pos = start_pos.expand(B, T)
        k_old = self.k[:B] if rows is None else self.k[rows]  # (B, H, W, D)
        v_old = self.v[:B] if rows is None else self.v[rows]
        slot_pos = self.pos[:B] if rows is None else self.pos[rows]  # (B, W)
        first = pos.min(-1, keepdim=True).values  # padding sits at max_len - 1, past real tokens
        seen_pos = torch.where(slot_pos >= first, -1, slot_pos)  # stale slots hidden
        keys = torch.cat([k_old, k.to(k_old.dtype)], dim=2)
        values = torch.cat([v_old, v.to(v_old.dtype)], dim=2)
        k_pos = torch.cat([seen_pos, pos], dim=1)
        # Keep each row's last W real keys: slot s takes the new key whose index is s mod W.
        # (A where over the ring, not an indexed write: a chunk may map two keys to one slot.)
        real = pos < self._max_len - 1
        top = torch.where(real, pos, -1).max(-1, keepdim=True).values
        hit = ((real & (pos > top - W)).unsqueeze(-1)
               & ((pos % W).unsqueeze(-1) == torch.arange(W, device=pos.device)))  # (B, T, W)
        has = hit.any(1)  # (B, W)
        src = hit.to(torch.uint8).argmax(1)  # (B, W): the new key each slot takes
        take = src[:, None, :, None].expand(B, H, W, D)
        new_k = torch.where(has[:, None, :, None], k.to(k_old.dtype).gather(2, take), k_old)
        new_v = torch.where(has[:, None, :, None], v.to(v_old.dtype).gather(2, take), v_old)
        new_pos = torch.where(has, pos.gather(1, src), slot_pos)
        if rows is None:
            self.k[:B], self.v[:B], self.pos[:B] = new_k, new_v, new_pos
        else:
            self.k[rows], self.v[rows], self.pos[rows] = new_k, new_v, new_pos
        return keys, values, k_pos

    def _update_eager(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int path (rows 0..B-1, all at the same indices): the window's earlier keys in
        order, then the new ones; S = min(start_pos, window - 1) + T."""
        B, _, T, _ = k.shape
        W, end = self.window, start_pos + k.shape[2]
        _check_room(end, self._max_len)
        device = self.k.device
        old = torch.arange(max(0, start_pos - W + 1), start_pos, device=device)
        keys = torch.cat([self.k[:B, :, old % W], k.to(self.k.dtype)], dim=2)
        values = torch.cat([self.v[:B, :, old % W], v.to(self.v.dtype)], dim=2)
        kept = torch.arange(max(start_pos, end - W), end, device=device)
        slots = kept % W
        self.k[:B, :, slots] = k[:, :, kept - start_pos].to(self.k.dtype)
        self.v[:B, :, slots] = v[:, :, kept - start_pos].to(self.v.dtype)
        self.pos[:B, slots] = kept
        return keys, values, torch.arange(start_pos - len(old), end, device=device)


class RingSlotView:
    """Some rows of a RingKVCache, seen as a cache of their own (a server's slots)."""

    def __init__(self, cache: RingKVCache, rows: list[int]) -> None:
        self.cache = cache
        in_order = rows == list(range(len(rows)))
        self.rows = None if in_order else torch.tensor(rows, device=cache.k.device)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def update(
        self, start_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.cache.update(start_pos, k, v, self.rows)


class StateCache(nn.Module):
    """The fixed-size state of one linear-attention layer for `batch` rows, whatever the length:
    `conv` (B, conv_dim, kernel - 1), the convolution's last inputs, in the cache dtype, and
    `state` (B, H_v, d_k, d_v), the delta rule's memory, in fp32 (it sums over the whole
    sequence). `max_len` is the positions a sequence may span (the attention layers' caches').

    The conv-only form (n_v_head = 0, a short-convolution layer's) has an empty `state`
    (B, 0, 0, 0): the same reads, writes and row views, and no bytes for matrices."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        conv_dim: int,
        kernel: int,
        n_v_head: int = 0,
        k_dim: int = 0,
        v_dim: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self._max_len = max_len
        self.register_buffer("conv", torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("state", torch.zeros(batch, n_v_head, k_dim, v_dim, device=device),
                             persistent=False)

    @property
    def max_len(self) -> int:
        return self._max_len

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.state.numel() * self.state.element_size()

    def rows(self, rows: list[int], length: int) -> StateSlotView:
        """Buffer rows `rows` as a cache of their own (`length`, the attention read length,
        means nothing to a state)."""
        return StateSlotView(self, rows)

    def read(
        self, start_pos: int | torch.Tensor, batch: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv, state) of the batch's rows before this pass; (None, None) (zeros) when the
        pass starts a sequence (int start_pos 0). start_pos a tensor (T,) or (B, T): rows whose
        first index is 0 read zeros. rows (B,): buffer rows, None = 0..B-1."""
        if isinstance(start_pos, int):
            _check_room(start_pos + 1, self._max_len)
            if start_pos == 0:
                return None, None
            return self.conv[:batch], self.state[:batch]
        conv = self.conv[:batch] if rows is None else self.conv[rows]
        state = self.state[:batch] if rows is None else self.state[rows]
        fresh = start_pos.expand(batch, start_pos.shape[-1])[:, 0] == 0  # (B,)
        conv = torch.where(fresh[:, None, None], 0.0, conv)  # a scalar: no zeros to allocate
        state = torch.where(fresh[:, None, None, None], 0.0, state)
        return conv, state

    def write(
        self, conv: torch.Tensor, state: torch.Tensor | None = None, start_pos: int | torch.Tensor = 0,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Keep the batch's rows' state after this pass: conv (B, conv_dim, kernel - 1), state
        (B, H_v, d_k, d_v) (None: the conv-only form, nothing else to keep); rows None = 0..B-1.
        start_pos a tensor (T,) or (B, T): a row whose last index is max_len - 1 keeps the state
        it had (a parked dummy token, or a sequence's very last position, after which nothing is
        read)."""
        B = conv.shape[0]
        conv = conv.to(self.conv.dtype)
        if isinstance(start_pos, torch.Tensor):
            parked = start_pos.expand(B, start_pos.shape[-1])[:, -1] == self._max_len - 1  # (B,)
            conv = torch.where(parked[:, None, None], self.conv[:B] if rows is None else self.conv[rows], conv)
            if state is not None:
                state = torch.where(parked[:, None, None, None],
                                    self.state[:B] if rows is None else self.state[rows], state)
        if rows is None:
            self.conv[:B] = conv
            if state is not None:
                self.state[:B] = state
        else:
            self.conv[rows] = conv
            if state is not None:
                self.state[rows] = state

    def clear(self, row: int) -> None:
        """Zero buffer row `row` (a server slot whose request ended, or that a new one takes)."""
        self.conv[row].zero_()
        self.state[row].zero_()


class StateSlotView:
    """Some rows of a StateCache, seen as a cache of their own (a server's slots)."""

    def __init__(self, cache: StateCache, rows: list[int]) -> None:
        self.cache = cache
        in_order = rows == list(range(len(rows)))
        self.rows = None if in_order else torch.tensor(rows, device=cache.state.device)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def read(self, start_pos: int | torch.Tensor, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.cache.read(start_pos, batch, self.rows)

    def write(self, conv: torch.Tensor, state: torch.Tensor | None = None,
              start_pos: int | torch.Tensor = 0) -> None:
        self.cache.write(conv, state, start_pos, self.rows)
