"""Speculative decoding in the server (`bardlm serve --draft DIR|ngram [--draft-tokens K]`).

Decoding is memory-bound at small batch: one token per pass reads every weight, and so does a
pass checking K + 1 tokens. At large batch the weights are already shared by the batch's rows
and a verify pass would only add work, so the engine speculates only while at most
`MAX_SPECULATING` (one) job is generating, and decodes plainly in batch otherwise (vLLM's
"disable speculation by batch size"). A job may switch between the two at any token boundary:
both keep the engine's invariant (a job's last token is not yet in its slot's cache).

One round for the lone job: the drafter guesses up to K tokens after its sequence; one pass of
the target writes the last token and the K guesses into the job's slot at their own cache
indices (K + 1 rows of logits); the tokens kept are chosen by infer/speculative.py's rules
(greedy: while the guesses equal the argmax, so the reply is plain greedy's, token for token;
sampled: accept/reject, each token distributed as the target's). A rejected guess is rolled back
by position alone: its keys sit past the job's new length, hidden by the causal mask (cache
index <= query position) and rewritten before they are read.

Memory is bounded: one draft model with one cache row of the engine's context (a slot's length),
owned by the job that speculated last; another job taking over starts it afresh (its sequence is
read into the draft cache on its first round), and a job that ends (finished, failed, or its
client gone) gives it up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..infer.budget import context_window
from ..infer.layouts import pack_rows
from ..infer.sampling import is_greedy
from ..infer.speculative import (
    accept_reject,
    check_draft_tokens,
    check_draftable,
    greedy_accept,
    make_drafter,
    target_probs,
)

MAX_SPECULATING = 1  # speculate while at most this many jobs generate; batch plainly above


class Speculator:
    """Speculative rounds for the server's engine: `takes(rows)` says whether this turn's
    generating jobs should speculate, `decode(r, cache, emit)` runs one round for job r, and
    `forget(r)` drops what the draft holds of a job that ended."""

    def __init__(self, model: torch.nn.Module, draft: str | torch.nn.Module, draft_tokens: int,
                 context: int, pack: bool = True) -> None:
        """pack: give an fp32 model oneDNN-packed weights for its several-row passes (off under
        `--compile`, whose traced step keeps the plain layout)."""
        check_draft_tokens(draft_tokens)
        check_draftable(model, draft, context)
        if pack:  # fp32: a verify pass costs about one step, not K + 1 (infer/layouts.py)
            pack_rows(model)
        self.model, self.k = model, draft_tokens
        self.device = next(model.parameters()).device
        # The draft's one cache row: a slot's length, or the draft's own context if shorter.
        self.draft_len = context if isinstance(draft, str) else min(
            context, context_window(draft.config, None))
        self.drafter = make_drafter(draft, self.draft_len)
        self.owner: Any = None  # the job whose sequence the drafter holds
        self.gen: torch.Generator | None = None  # the owner's CPU generator, off a CPU device
        self.counts = {"rounds": 0, "drafted": 0, "accepted": 0}  # verify passes, guesses

    def takes(self, rows: list[Any]) -> bool:
        """Speculate this turn? Few enough jobs generate, and none with a repetition penalty
        (it would make the target's distribution depend on which guesses were kept)."""
        return len(rows) <= MAX_SPECULATING and all(
            r.job.sampling.get("repetition_penalty", 1.0) == 1.0 for r in rows)

    def forget(self, r: Any) -> None:
        """Job r left its slot: the drafter no longer holds its sequence."""
        if self.owner is r:
            self.owner, self.gen = None, None
            self.drafter.reset()

    def decode(self, r: Any, cache: list[Any], emit: Callable[[Any, int], bool]) -> None:
        """One speculative round for job r (a `_Running`, alone in the batch): emit(r, token)
        each token kept, in order, until it returns False (the job ended)."""
        if self.owner is not r:
            self.forget(self.owner)
            self.owner = r
            seed = r.job.sampling.get("seed")
            if r.gens is not None and r.gens[0].device.type != "cpu":  # the rule draws on the CPU
                self.gen = torch.Generator().manual_seed(seed)
        gen = self.gen if self.gen is not None else (r.gens[0] if r.gens else None)
        s = r.job.sampling
        sampling = (s.get("temperature", 1.0), s.get("top_k"), s.get("top_p"), s.get("min_p"))
        greedy = is_greedy(sampling[0])
        seq = r.ids  # prompt + tokens so far; its last token is not yet in the slot's cache
        context = cache[0].max_len
        # Guesses fit the slot and the draft's cache, and leave the round's own token in budget.
        k = max(0, min(self.k, context - len(seq), self.draft_len - len(seq),
                       r.job.max_tokens - r.steps - 1))

        def sample_draft(logits: torch.Tensor) -> tuple[int, torch.Tensor]:
            q = target_probs(logits, *sampling)[0].cpu()
            return int(torch.multinomial(q, 1, generator=gen)), q

        guesses, q = self.drafter.propose(seq, k, None if greedy else sample_draft) if k else ([], None)
        n = len(guesses) + 1
        ids = torch.tensor([[seq[-1], *guesses]], device=self.device)  # (1, n)
        cache_pos = torch.arange(len(seq) - 1, len(seq) - 1 + n, device=self.device)[None]
        view = [c.rows([r.slot], len(seq) - 1 + n) for c in cache]
        logits = self.model(ids, start_pos=cache_pos, cache=view, logits_rows=n)[0][0]  # (n, V)
        if greedy:
            new = greedy_accept(logits.argmax(-1).tolist(), guesses)
        else:
            new = accept_reject(target_probs(logits, *sampling).cpu(), q, guesses, gen)
        self.counts["rounds"] += 1
        self.counts["drafted"] += len(guesses)
        self.counts["accepted"] += len(new) - 1
        for token in new:
            if not emit(r, token):
                return
        self.drafter.accepted(len(r.ids))
