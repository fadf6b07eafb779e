"""How long a KV cache may be: the context window, and the token budget that fits in memory.

A cache is `slots` rows of `tokens` positions each, every position holding a key and a value
per cached layer and KV head: 2 * n_kv_head * head_dim elements a layer (`kv_bytes_per_token`;
Gemma 4's KV-shared layers hold none, and its global layers have their own head size), or under
latent attention (DeepSeek's MLA) a latent and a RoPE key a layer: kv_lora_rank +
qk_rope_head_dim (`ModelConfig.cache_width`).
Reserving every slot a full context does not fit real models (llama-3.2-1b: 131,072 positions x
32 KiB = 4 GiB per slot in fp32), so the server sizes its slots from the memory available, as
vLLM and llama.cpp do: a total token budget shared by the slots, each slot getting
budget / slots positions (`plan_cache`), and a request longer than a slot is refused.

A sliding-window layer holds at most its window per slot whatever the slot's length
(nn/cache.py `RingKVCache`), so a slot of a model with local layers costs
`kv_bytes_per_sequence`, less than tokens x `kv_bytes_per_token`; a linear (gated delta rule)
layer holds no positions but a fixed state per slot (`state_bytes_per_sequence`).

One slot length for every row keeps the decode step's shapes static (so it compiles once per
shape); `read_length` bounds how much of it attention reads while only a prefix is filled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import BardlmError

GiB = 2**30
DEFAULT_SHARE = 0.5  # of the memory available after loading the model, for the default budget
ROUND = 256  # default slot lengths are multiples of this (when above it): friendlier shapes
READ_BUCKETS = 6  # compiled steps read one of this many prefix lengths of the cache


def context_window(cfg, max_context: int | None) -> int:  # noqa: ANN001
    """How many positions one forward pass may see.

    Learned and sinusoidal tables end at `block_size`; rotary (and position-free) models can run
    past it, up to `max_context` when given.
    """
    if max_context is None:
        return cfg.block_size
    if max_context <= 0:
        raise BardlmError(f"max_context must be positive, got {max_context}")
    if cfg.pos in ("learned", "sinusoidal") and max_context > cfg.block_size:
        raise BardlmError(
            f"{cfg.pos} positions end at the context length {cfg.block_size}; "
            f"max_context {max_context} needs a rope model, or pass at most {cfg.block_size}"
        )
    return max_context


def _layer_position_bytes(cfg, element_size: int) -> list[int]:  # noqa: ANN001
    """Bytes of one position's key + value (or latent + RoPE key) in each cached layer
    (`ModelConfig.cache_layers`: KV-shared layers hold none), with that layer's KV heads and
    head size (`ModelConfig.cache_width`)."""
    return [cfg.cache_width(i) * element_size for i in cfg.cache_layers()]


def kv_bytes_per_token(cfg, element_size: int) -> int:  # noqa: ANN001
    """Bytes one position takes in a model's cache: a key and a value per cached layer and KV
    head (or a latent and a RoPE key per layer: `ModelConfig.cache_width`)."""
    return sum(_layer_position_bytes(cfg, element_size))


def state_bytes_per_sequence(cfg, element_size: int) -> int:  # noqa: ANN001
    """Bytes of one sequence's fixed state in the linear (gated delta rule) layers, at any
    length: the conv inputs in the cache dtype, the delta rule's matrices in fp32
    (nn/cache.py `StateCache`)."""
    conv, state = cfg.linear_state_elements()
    return conv * element_size + state * 4


def kv_bytes_per_sequence(cfg, tokens: int, element_size: int) -> int:  # noqa: ANN001
    """Bytes of keys and values one sequence of `tokens` positions holds: every position in a
    global layer, at most `sliding_window` in a local one (`ModelConfig.layer_cache_lengths`)."""
    return sum(n * b for n, b in zip(cfg.layer_cache_lengths(tokens),
                                     _layer_position_bytes(cfg, element_size)))


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for new tensors on `device`: free accelerator memory, or the RAM the OS can
    hand out (MemAvailable, which counts reclaimable page cache; free pages if psutil is
    missing, an underestimate)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CachePlan:
    """`slots` cache rows of `tokens` positions each: `bytes_per_token` bytes a position when
    every layer holds every position, `slot_bytes` a slot (less with sliding-window layers)."""

    slots: int
    tokens: int
    bytes_per_token: int
    slot_bytes: int

    @property
    def total_tokens(self) -> int:
        return self.slots * self.tokens

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def describe(self) -> str:
        """e.g. "kv cache: 8 slots x 4,096 tokens = 32,768 tokens, 3.50 GiB" (MiB under 1 GiB)."""
        size = f"{self.nbytes / GiB:.2f} GiB" if self.nbytes >= GiB else f"{self.nbytes / 2**20:.1f} MiB"
        return (f"kv cache: {self.slots} slots x {self.tokens:,} tokens = {self.total_tokens:,} "
                f"tokens, {size}")


def plan_cache(cfg, slots: int, element_size: int, available: int,  # noqa: ANN001
               max_context: int | None = None, share: float = DEFAULT_SHARE) -> CachePlan:
    """The cache for `slots` rows of a model `cfg`, in `available` bytes.

    max_context given: every slot holds that many positions (at most what the positions allow,
    `context_window`), refused when the slots need more than `available`. Not given: a slot
    holds the model's context (`block_size`) or, when that does not fit, the positions that
    `share` of `available` holds divided among the slots (a multiple of 256 above 256);
    refused when not even min(block_size, 256) positions fit a slot.
    """
    per_token = kv_bytes_per_token(cfg, element_size)

    def plan_for(tokens: int) -> CachePlan:
        return CachePlan(slots, tokens, per_token, kv_bytes_per_sequence(cfg, tokens, element_size)
                         + state_bytes_per_sequence(cfg, element_size))

    def most_tokens(budget: int, limit: int) -> int:
        """The most positions (<= limit) a slot may have with `slots` of them in `budget` bytes
        (a slot's bytes grow with its length, so: a binary search)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if plan_for(mid).nbytes <= budget else (lo, mid - 1)
        return lo

    if max_context is not None:
        tokens = context_window(cfg, max_context)
        plan = plan_for(tokens)
        if plan.nbytes > available:
            most = most_tokens(available, tokens)
            fix = f"pass --max-context {most} or less, or a smaller --max-batch" if most else \
                "pass a smaller --max-batch"
            raise BardlmError(
                f"{plan.describe()} does not fit in the {available / GiB:.2f} GiB available; {fix}")
        return plan
    tokens = most_tokens(int(available * share), cfg.block_size)
    if tokens > ROUND and tokens < cfg.block_size:
        tokens -= tokens % ROUND
    least = min(cfg.block_size, ROUND)
    if tokens < least:
        raise BardlmError(
            f"kv cache: {slots} slots of {least} tokens ({plan_for(least).nbytes / GiB:.2f} "
            f"GiB) do not fit in {share:.0%} of the {available / GiB:.2f} GiB available; "
            "pass a smaller --max-batch or --max-context, or free memory")
    return plan_for(tokens)


def read_length(filled: int, cache_len: int, buckets: int = READ_BUCKETS) -> int:
    """How many cache positions a static-shape step reads when `filled` are in use.

    The smallest of cache_len, cache_len/2, ..., cache_len/2^(buckets-1) (rounded up) that
    holds `filled`: attention reads at most twice what is filled (or cache_len/2^(buckets-1)),
    and a compiled step sees at most `buckets` shapes, each compiled once (within torch's
    default limit of 8 recompiles).
    """
    length = cache_len
    for k in range(1, buckets):
        shorter = -(-cache_len // 2**k)
        if shorter < filled:
            break
        length = shorter
    return length
