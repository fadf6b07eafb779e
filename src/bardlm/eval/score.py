"""The one scoring primitive of bardlm's evaluations: log-probabilities of given tokens.

A *row* is a list of token ids; `start` says which of them are scored. Token t of a row (for
t >= max(start, 1)) is scored by the log-probability the model gives it after reading row[:t].
The model reads row[:-1] (so a row may hold at most context + 1 tokens).

    rows (N lists) --right-pad, batch--> model.hidden_states(x (B, T)) -> h (B, T, C)
    --head on the scored positions, SCORE_CHUNK at a time--> logits (chunk, V)
    --log_softmax, gather at row[t]--> per-token log-probs, from `start` on

Only SCORE_CHUNK positions' logits exist at once: a 1,024-token window of a 151,936-word
vocabulary would otherwise be 0.6 GB of logits per row, and as much again for its log-softmax.

Right padding never changes a causal model's earlier positions, so rows of different lengths
share a batch without a mask. Perplexity (`perplexity.py`), lm-evaluation-harness
(`harness.py`) and the server's logprobs all score through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BardlmError
from ..progress import progress_bar


@dataclass
class Scored:
    """The scored tokens of one row: log-probs (n,), whether each was the argmax (n,), and the
    row index of the first one (so logprobs[i] belongs to row[first + i])."""

    logprobs: torch.Tensor
    greedy: torch.Tensor
    first: int

    @property
    def total(self) -> float:
        return float(self.logprobs.double().sum())


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def forward_logprobs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, T) token ids -> log-softmax of the next-token logits (B, T, V), in fp32."""
    logits, _ = model(x.to(_device(model)))
    return F.log_softmax(logits.float(), dim=-1)


SCORE_CHUNK = 256  # positions whose (chunk, V) logits exist at a time


def _score(model: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, first: int) -> Scored:
    """h (n, C) final hidden states predicting targets (n,) -> their `Scored`, the logits made
    SCORE_CHUNK rows at a time."""
    logprobs, greedy = [], []
    for s in range(0, len(targets), SCORE_CHUNK):
        logp = F.log_softmax(model.head(h[s : s + SCORE_CHUNK]).float(), dim=-1)  # (chunk, V)
        t = targets[s : s + SCORE_CHUNK]
        logprobs.append(logp.gather(1, t[:, None])[:, 0])
        greedy.append(logp.argmax(-1) == t)
    if not logprobs:  # nothing to score in this row
        return Scored(torch.zeros(0), torch.zeros(0, dtype=torch.bool), first)
    return Scored(torch.cat(logprobs).cpu(), torch.cat(greedy).cpu(), first)


@torch.no_grad()
def score_rows(
    model: torch.nn.Module, rows: Sequence[Sequence[int]], starts: Sequence[int],
    batch_size: int = 8, progress: str | None = None,
) -> list[Scored]:
    """Score rows[i][t] for t in [max(starts[i], 1), len(rows[i])), one `Scored` per row.

    Rows are batched longest first (less padding) and the results put back in the input order.
    progress: a label for a bar of rows scored (`bardlm.progress`: on a terminal only), or None.
    """
    if batch_size <= 0:
        raise BardlmError(f"batch size must be positive, got {batch_size}")
    limit = model.config.block_size + 1
    if any(len(r) > limit for r in rows):
        raise BardlmError(f"a row is longer than the context + 1 = {limit} tokens; crop it")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[Scored | None] = [None] * len(rows)
    bar = progress_bar(progress is not None, len(rows), progress or "", unit="row")
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        T = max(max(len(rows[i]) for i in idx) - 1, 1)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, : len(rows[i]) - 1] = torch.as_tensor(rows[i][:-1], dtype=torch.long)
        hidden = model.hidden_states(x.to(_device(model)))  # (B, T, C); position t-1 predicts token t
        for j, i in enumerate(idx):
            first = max(starts[i], 1)
            targets = torch.as_tensor(rows[i][first:], dtype=torch.long, device=hidden.device)
            out[i] = _score(model, hidden[j, first - 1 : len(rows[i]) - 1], targets, first)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]
