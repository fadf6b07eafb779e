"""Autoregressive generation: a prefill pass over the prompt, then one token per step.

With a KV cache each step feeds only the newest token at `start_pos`; without one it re-reads
the whole window. Both give the same tokens (a test holds them equal). Once a sequence is longer
than the context, the window slides: the last `block_size` tokens are re-read and the cache is
rebuilt from them, exactly what the uncached path does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .errors import BardlmError
from .sampling import apply_repetition_penalty, check_sampling, sample


def check_prompt(n_prompt: int, max_new_tokens: int) -> None:
    if n_prompt == 0:
        raise BardlmError("the prompt is empty; give at least one token of prompt")
    if max_new_tokens <= 0:
        raise BardlmError(f"max_new_tokens must be positive, got {max_new_tokens}")


@torch.no_grad()
def stream_ids(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, for prompts idx (B, T)."""
    cfg = model.config
    check_prompt(idx.shape[1], max_new_tokens)
    check_sampling(temperature, top_k, top_p, cfg.vocab_size, min_p, repetition_penalty)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=idx.device).manual_seed(seed)
    B, window = idx.shape[0], cfg.block_size
    seq = idx
    cache = model.make_cache(B, min(window, idx.shape[1] + max_new_tokens)) if use_cache else None
    cached = 0  # how many positions of the current window the cache holds
    for _ in range(max_new_tokens):
        if cache is not None and cached and seq.shape[1] <= window:
            logits, _ = model(seq[:, -1:], start_pos=cached, cache=cache)
        else:  # first step, no cache, or the window slid: read the (cropped) window whole
            ctx = seq[:, -window:]
            logits, _ = model(ctx, cache=cache)
        cached = min(seq.shape[1], window)
        logits = apply_repetition_penalty(logits[:, -1, :].float(), seq, repetition_penalty)
        nxt = sample(logits, temperature, top_k, top_p, min_p, gen)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        yield nxt


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:  # noqa: ANN003
    """idx (B, T) -> (B, T + max_new_tokens): the prompts followed by their continuations."""
    new = list(stream_ids(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def encode_prompt(tokenizer, prompt: str) -> list[int]:  # noqa: ANN001
    """Prompt ids, failing on text the vocabulary cannot express (never a silent <unk>)."""
    if not prompt:
        raise BardlmError("the prompt is empty; pass --prompt with some text")
    try:
        return tokenizer.encode(prompt, strict=True)
    except TypeError:  # tokenizers without a strict mode cover every string
        return tokenizer.encode(prompt)


def generate_text(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    prompt: str,
    max_new_tokens: int = 200,
    stop: list[str] | None = None,
    on_text: Callable[[str], None] | None = None,
    **kwargs,  # noqa: ANN003
) -> str:
    """The continuation of `prompt` as text; `on_text` receives pieces as they are decoded.

    Generation ends at the first stop string, which is not included: text that might be the
    start of a stop string is held back until it is known not to be.
    """
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) > model.config.block_size:
        raise BardlmError(
            f"the prompt is {len(ids)} tokens, longer than the context of "
            f"{model.config.block_size}; shorten it"
        )
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new_ids: list[int] = []
    emitted = 0
    text = ""
    stop = [s for s in (stop or []) if s]
    for nxt in stream_ids(model, idx, max_new_tokens, **kwargs):
        new_ids.append(int(nxt[0]))
        text = tokenizer.decode(new_ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        hold = max((_overlap(text, s) for s in stop), default=0)
        safe = len(text) - hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from a byte-level tokenizer
            safe = min(safe, len(text) - 1)
        if on_text is not None and safe > emitted:
            on_text(text[emitted:safe])
            emitted = safe
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
