"""From logits to the next token: temperature, top-k, top-p (nucleus), min-p, repetition penalty."""

from __future__ import annotations

import math

import torch

from ..errors import BardlmError

# The repetition penalty divides logits: bounded so that it can neither blow them up nor
# flatten them to nothing (the server's request models use the same bounds).
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; row b samples with seed + b


def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, vocab_size: int,
    min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
) -> None:
    """Raise a one-line `BardlmError` for any out-of-range sampling argument (NaN included:
    it passes every comparison and would reach `torch.multinomial`)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise BardlmError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise BardlmError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # NaN fails `0 < x` too
        raise BardlmError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise BardlmError(f"min_p must be in [0, 1], got {min_p}")
    if not MIN_PENALTY <= repetition_penalty <= MAX_PENALTY:
        raise BardlmError(f"repetition_penalty must be in [{MIN_PENALTY}, {MAX_PENALTY:g}] (1 = off), "
                          f"got {repetition_penalty}")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise BardlmError(f"seed must be an integer in [0, 2**63), got {seed}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive logits (multiply negative ones) of tokens already seen.

    logits (B, V); seen (B, N) ids of the tokens so far (prompt + generated).
    """
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(
    logits: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Set to -inf every logit (B, V) outside the top-k, the nucleus and the min-p set.

    top-p keeps the smallest set of most likely tokens whose probabilities sum to at least p;
    min-p keeps tokens whose probability is at least min_p times the most likely one's.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach p (so the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # rounding must never drop the most likely token
        drop = drop.scatter(-1, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def is_greedy(temperature: float) -> bool:
    """Whether `sample` at this temperature takes the argmax: 0, or anything too small to divide
    by in fp32."""
    return temperature < 1e-5


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from the last position's logits (B, V); temperature 0 is greedy.

    generator: one for the batch, or a list with one per row (rows then sample independently of
    what else is in the batch).
    """
    if is_greedy(temperature):
        return logits.argmax(-1)
    logits = logits.float()
    # Shift so the largest logit is 0 before dividing: a tiny temperature then gives -inf for
    # the rest (a sharp but valid distribution) instead of inf - inf = NaN.
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    logits = filter_logits(logits, top_k, top_p, min_p)
    probs = logits.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
