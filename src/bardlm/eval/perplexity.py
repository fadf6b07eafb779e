"""Perplexity of a model on any text, with the sliding window of the Hugging Face guide.

    https://huggingface.co/docs/transformers/perplexity

Windows of up to L tokens start every S tokens (begin = 0, S, 2S, ...; end = min(begin + L, N)).
Each window scores only the tokens the previous window did not (those in [prev_end, end)), so a
token is scored once, with up to L - S tokens of context before the window's new part. The
very first token of the text has no prediction; with S = L the windows do not overlap and the
first token of every window goes unscored too (as in the guide). The last window ends the text.

    S = 2, L = 4, N = 7:   [0 1 2 3]          scores 1 2 3
                               [2 3 4 5]      scores 4 5     (context 2 3)
                                   [4 5 6]    scores 6       (context 4 5)

Numbers (`PerplexityResult`): `loss` = mean negative log-likelihood in nats per scored token,
`perplexity` = exp(loss), `bits_per_byte` = total NLL / ln 2 / UTF-8 bytes of the scored tokens
(the unscored first token of the text, and of every window when S = L, count neither bits nor
bytes: dividing by the whole text's bytes would flatter the model by the unscored share).
Bits per byte does not depend on the tokenizer's unit (a character, a word, a BPE piece), so it
compares any two models on the same text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import BardlmError
from ..infer.generate import encode_prompt
from ..tokenizers.base import utf8
from .score import score_rows


@dataclass
class PerplexityResult:
    loss: float  # nats per scored token
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens of the text
    scored_tokens: int  # tokens with a prediction (tokens - 1 when S < L)
    bytes: int  # UTF-8 bytes of the text
    scored_bytes: int  # UTF-8 bytes of the scored tokens: the denominator of bits_per_byte
    max_length: int
    stride: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window of a text of n tokens: the window is ids[begin:end] and
    it scores tokens [first, end) (first >= begin + 1: a window's first token is context)."""
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def check_window(max_length: int, stride: int, context: int) -> None:
    if max_length <= 1:
        raise BardlmError(f"--max-length must be at least 2 tokens, got {max_length}")
    if max_length > context:
        raise BardlmError(
            f"--max-length {max_length} is longer than the model's context of {context} tokens; "
            f"pass at most {context}")
    if stride <= 0:
        raise BardlmError(f"--stride must be positive, got {stride}")
    if stride > max_length:
        raise BardlmError(
            f"--stride {stride} is larger than --max-length {max_length}; tokens between windows "
            "would never be scored: pass a stride of at most the max length")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the whole text; a character or word the vocabulary lacks is an error (a
    silent <unk> would score a different text)."""
    if tokenizer is None:
        raise BardlmError("this model has no tokenizer (no tokenizer.json); it cannot read text")
    if not text:
        raise BardlmError("the text is empty; give a file with some text in it")
    return encode_prompt(tokenizer, text)


def token_bytes(tokenizer: Any, ids: list[int], p: int) -> int:
    """UTF-8 bytes that token p adds to the decoded text (decoded with a few tokens of left
    context, so that byte-level pieces of one character are counted where they complete)."""
    lo = max(0, p - 8)
    return len(utf8(tokenizer.decode(ids[lo : p + 1]))) - len(utf8(tokenizer.decode(ids[lo:p])))


def perplexity_of_ids(
    model: torch.nn.Module, ids: list[int], n_bytes: int, max_length: int | None = None,
    stride: int | None = None, batch_size: int = 8, tokenizer: Any = None, progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of token ids (defaults: L = the model's context, S = L).

    With `tokenizer`, bits per byte divides by the bytes of the scored tokens only; without,
    by `n_bytes` (exact when every token is scored but the first, of one byte)."""
    L = model.config.block_size if max_length is None else max_length
    S = L if stride is None else stride
    check_window(L, S, model.config.block_size)
    if len(ids) < 2:
        raise BardlmError(
            f"the text is {len(ids)} token long; perplexity needs at least 2 (the first token "
            "has no prediction)")
    windows = sliding_windows(len(ids), L, S)
    # The rows for `score_rows` hold one more token than the model reads: the window itself.
    scored = score_rows(model, [ids[b:e] for b, e, _ in windows],
                        [f - b for b, _, f in windows], batch_size, "eval" if progress else None)
    nll = -sum(s.total for s in scored)
    n = sum(len(s.logprobs) for s in scored)
    loss = nll / n
    scored_bytes = n_bytes
    if tokenizer is not None:  # the tokens no window scores: the first, and window starts if S = L
        covered = {p for _, e, f in windows for p in range(f, e)}
        scored_bytes -= sum(token_bytes(tokenizer, ids, p) for p in range(len(ids)) if p not in covered)
    return PerplexityResult(
        loss=loss, perplexity=math.exp(loss), bits_per_byte=nll / math.log(2) / max(scored_bytes, 1),
        tokens=len(ids), scored_tokens=n, bytes=n_bytes, scored_bytes=scored_bytes, max_length=L,
        stride=S, windows=len(windows))


def perplexity(model: torch.nn.Module, tokenizer: Any, text: str, **kwargs: Any) -> PerplexityResult:
    """Sliding-window perplexity of `text` (see the module docstring); kwargs: max_length,
    stride, batch_size, progress (a bar of windows scored, on a terminal)."""
    ids = encode_text(tokenizer, text)
    return perplexity_of_ids(model, ids, len(utf8(text)), tokenizer=tokenizer, **kwargs)

