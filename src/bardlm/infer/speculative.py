"""Speculative decoding: a cheap drafter proposes K tokens, the model checks them in one pass.

    bardlm generate --ckpt DIR --draft DRAFT_DIR|ngram [--draft-tokens K]

Decoding one token reads every weight once; checking K + 1 tokens in one pass reads them once
too. So a drafter guesses the next K tokens, the target model scores the last accepted token
and the K guesses in one forward pass (K + 1 rows of logits), and every guess it agrees with
is a token gained. Two drafters:

* a draft model (a smaller model with the same tokenizer) decoding K tokens with its own cache;
* prompt lookup ("ngram"): the tokens that followed the latest earlier occurrence of the last
  n tokens (n = 3, 2, 1) in the sequence so far; no second model, and strong on text that
  repeats its prompt (editing, summarising, code).

Greedy (temperature 0) keeps a guess while it equals the model's argmax and then appends the
model's own token, so the output is plain greedy decoding's, token for token. Sampling uses the
standard accept/reject rule (Leviathan et al. 2023; Chen et al. 2023): guess x drawn from the
drafter's distribution q is kept with probability min(1, p(x) / q(x)); on the first rejection
the token is drawn from normalise(max(0, p - q)); if all K are kept, one more is drawn from p.
Each emitted token is then distributed exactly as p, the model's own (temperature, top-k,
top-p, min-p applied to both). Prompt lookup proposes deterministically: q is a point mass.

An fp32 model (`prepare_for_inference`) gets a oneDNN-packed copy of its weights on first use
(`layouts.pack_rows`, twice the weight memory): without it a verify pass of 5 rows cost ~2.7
one-row steps on this project's CPU, and speculation gained almost nothing in fp32.

Caches roll back for free: both caches are written by position, so a rejected guess is simply
overwritten by the next round (the invariant: the sequence's last token is not yet in the
target's cache). Batch 1 only; no repetition penalty (it would make p depend on which guesses
were kept); the sequence must fit the context (no sliding window).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from ..config import STATE_KINDS
from ..errors import BardlmError
from .budget import context_window
from .generate import check_prompt, eval_mode
from .layouts import pack_rows
from .sampling import check_sampling, filter_logits, is_greedy

DEFAULT_DRAFT_TOKENS = 4
MAX_NGRAM = 3


def target_probs(logits: torch.Tensor, temperature: float, top_k: int | None,
                 top_p: float | None, min_p: float | None) -> torch.Tensor:
    """logits (N, V) -> the distributions (N, V) fp32 that `sampling.sample` draws from."""
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    return filter_logits(logits, top_k, top_p, min_p).softmax(-1)


def accept_reject(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                  gen: torch.Generator | None) -> list[int]:
    """The tokens one round emits: accepted guesses, then one drawn token.

    p (K + 1, V): the model's distributions after the last accepted token and after each of the
    K guesses; q (K, V): the drafter's distributions the guesses were drawn from (None: point
    masses at the guesses); drafts: the K guesses. Returns 1..K+1 tokens, each distributed as p.
    """
    out: list[int] = []
    for i, x in enumerate(drafts):
        px = p[i, x].item()
        qx = 1.0 if q is None else q[i, x].item()
        u = torch.rand((), generator=gen).item()
        if qx > 0 and u < min(1.0, px / qx):
            out.append(x)
            continue
        if q is None:  # a point mass: max(0, p - q) is p without x
            residual = p[i].clone()
            residual[x] = 0
        else:
            residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q (to rounding): any draw from p is right
            residual = p[i]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=gen)))
        return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=gen)))
    return out


def greedy_accept(p_argmax: list[int], drafts: list[int]) -> list[int]:
    """Greedy: keep guesses while they equal the model's argmax, then the model's own token."""
    out: list[int] = []
    for i, x in enumerate(drafts):
        if x != p_argmax[i]:
            break
        out.append(x)
    out.append(p_argmax[len(out)])
    return out


class Drafter(Protocol):
    def propose(self, seq: list[int], k: int, sample: SampleFn | None
                ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k guesses for the tokens after `seq`, and their distributions (k', V) (None for
        a deterministic drafter)."""

    def accepted(self, n_seq: int) -> None:
        """The first `n_seq` tokens of the sequence are final (earlier guesses may be gone)."""

    def reset(self) -> None:
        """Forget the sequence: the next `propose` may be for another one (the server's slots)."""


class SampleFn(Protocol):
    def __call__(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]: ...


class PromptLookup:
    """Prompt-lookup drafting: continue the latest earlier match of the last n tokens."""

    def __init__(self, max_ngram: int = MAX_NGRAM) -> None:
        self.max_ngram = max_ngram

    def propose(self, seq: list[int], k: int, sample: SampleFn | None
                ) -> tuple[list[int], torch.Tensor | None]:
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # latest match first
                if seq[start:start + n] == tail:
                    follow = seq[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None

    def accepted(self, n_seq: int) -> None:
        pass

    def reset(self) -> None:
        pass


class DraftModel:
    """A smaller model with the same tokenizer, decoding guesses with its own KV cache."""

    def __init__(self, model: torch.nn.Module, cache_len: int) -> None:
        self.model = model
        self.cache = model.make_cache(1, cache_len)
        self.n_cached = 0  # positions of the cache that hold final tokens
        self._written = 0  # positions written by the last `propose`
        self.device = next(model.parameters()).device

    def propose(self, seq: list[int], k: int, sample: SampleFn | None
                ) -> tuple[list[int], torch.Tensor | None]:
        guesses: list[int] = []
        dists: list[torch.Tensor] = []
        feed, pos = seq[self.n_cached:], self.n_cached
        with eval_mode(self.model):
            for _ in range(k):
                ids = torch.tensor([feed], dtype=torch.long, device=self.device)
                logits = self.model(ids, start_pos=pos, cache=self.cache, logits_rows=1)[0][0, -1]
                pos += len(feed)
                if sample is None:
                    x, q = int(logits.argmax()), None
                else:
                    x, q = sample(logits[None])
                guesses.append(x)
                if q is not None:
                    dists.append(q)
                feed = [x]
        self._written = pos  # seq and guesses[:-1] are in the cache
        return guesses, (torch.stack(dists) if dists else None)

    def accepted(self, n_seq: int) -> None:
        # The cache holds the old sequence and the guesses but the last; those accepted are a
        # prefix of the new sequence (whose last token was never fed).
        self.n_cached = self._written = min(n_seq - 1, self._written)

    def reset(self) -> None:
        # Nothing to clear: positions past `n_cached` are rewritten before they are read.
        self.n_cached = self._written = 0


def check_draft_tokens(draft_tokens: int) -> None:
    if not 1 <= draft_tokens <= 16:
        raise BardlmError(f"--draft-tokens must be between 1 and 16, got {draft_tokens}")


def check_draftable(model: torch.nn.Module, draft: str | torch.nn.Module, cache_len: int) -> None:
    """Refuse, in one line, a model and draft that speculative decoding cannot run: a draft
    with another vocabulary, or a layer whose cache cannot be rewound to drop rejected guesses
    (a fixed state; a sliding window's ring buffer shorter than the `cache_len` positions the
    caches hold, where a rejected guess's key has overwritten one the next token still reads)."""
    cfg = model.config
    if not isinstance(draft, str) and draft.config.vocab_size != cfg.vocab_size:
        raise BardlmError(f"the draft model's vocabulary ({draft.config.vocab_size}) is not the "
                          f"model's ({cfg.vocab_size}); a draft must share the tokenizer")
    for m in (model, draft):
        if hasattr(m, "config") and set(m.config.attn_layers) & set(STATE_KINDS):
            raise BardlmError("speculative decoding rewinds the cache, which the state of a "
                              "linear-attention (gated delta rule) or short-convolution layer "
                              "cannot; drop --draft for this model")
        if hasattr(m, "config") and min(m.config.layer_cache_lengths(cache_len), default=0) < cache_len:
            window = m.config.sliding_window
            raise BardlmError(f"speculative decoding rewinds the cache, which a sliding-window "
                              f"layer's ring buffer ({window} positions) cannot past its window; "
                              f"keep prompt + new tokens + --draft-tokens within {window} (the "
                              f"server: --max-context {window}), or drop --draft")


def make_drafter(draft: str | torch.nn.Module, cache_len: int) -> Drafter:
    """"ngram" -> prompt lookup; a model -> a `DraftModel`."""
    if isinstance(draft, str):
        if draft != "ngram":
            raise BardlmError(f"--draft takes a model directory or 'ngram', got {draft!r}")
        return PromptLookup()
    return DraftModel(draft, cache_len)


@torch.no_grad()
def stream_speculative(
    model: torch.nn.Module,
    idx: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    draft: str | torch.nn.Module = "ngram",
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    max_context: int | None = None,
    eos_ids: Iterable[int] = (),
    compile: bool = False,
    stats: dict | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (1,) like `generate.stream_ids` (same arguments, batch 1), with
    the tokens found by speculative decoding. `stats`, if given, receives "rounds" (target
    passes after the prompt), "drafted" and "accepted" (guesses)."""
    cfg = model.config
    device = next(model.parameters()).device
    rows = idx.tolist() if isinstance(idx, torch.Tensor) else [list(r) for r in idx]
    if len(rows) != 1:
        raise BardlmError(f"speculative decoding runs one sequence at a time, got a batch of "
                          f"{len(rows)}; drop --draft to decode a batch")
    seq = list(rows[0])
    check_prompt(len(seq), max_new_tokens)
    check_sampling(temperature, top_k, top_p, cfg.vocab_size, min_p, repetition_penalty, seed)
    check_draft_tokens(draft_tokens)
    if repetition_penalty != 1.0:
        raise BardlmError("speculative decoding does not take --repetition-penalty; drop one")
    if not use_cache or compile:
        raise BardlmError("speculative decoding needs the KV cache and eager steps; drop "
                          "--no-cache / --compile, or --draft")
    window = context_window(cfg, max_context)
    if not isinstance(draft, str):
        window = min(window, context_window(draft.config, max_context))
    need = len(seq) + max_new_tokens
    if need > window:
        raise BardlmError(f"speculative decoding does not slide the context: prompt + "
                          f"max_new_tokens = {need} > the context of {window}; lower "
                          "--max-new-tokens or drop --draft")
    cache_len = min(window, need + draft_tokens)
    check_draftable(model, draft, cache_len)
    pack_rows(model)  # fp32: a verify pass of K + 1 rows then costs about one row's (layouts.py)
    cache = model.make_cache(1, cache_len)
    drafter = make_drafter(draft, cache_len)
    gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    greedy = is_greedy(temperature)
    eos = set(eos_ids)
    stats = stats if stats is not None else {}
    stats.update(rounds=0, drafted=0, accepted=0)

    def sample_draft(logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        q = target_probs(logits, temperature, top_k, top_p, min_p)[0].cpu()
        return int(torch.multinomial(q, 1, generator=gen)), q

    with eval_mode(model):
        if len(seq) > 1:  # the invariant: the last token is never in the cache before a round
            model(torch.tensor([seq[:-1]], device=device), cache=cache, logits_rows=1)
        emitted = 0
        while emitted < max_new_tokens:
            room = cache_len - len(seq)  # positions left for the guesses after seq[-1]
            k = max(0, min(draft_tokens, room, max_new_tokens - emitted - 1))
            guesses, q = drafter.propose(seq, k, None if greedy else sample_draft) if k else ([], None)
            ids = torch.tensor([[seq[-1], *guesses]], device=device)
            logits = model(ids, start_pos=len(seq) - 1, cache=cache,
                           logits_rows=len(guesses) + 1)[0][0]  # (K' + 1, V)
            if greedy:
                new = greedy_accept(logits.argmax(-1).tolist(), guesses)
            else:
                p = target_probs(logits, temperature, top_k, top_p, min_p).cpu()
                new = accept_reject(p, q, guesses, gen)
            stats["rounds"] += 1
            stats["drafted"] += len(guesses)
            stats["accepted"] += len(new) - 1
            for tok in new[: max_new_tokens - emitted]:
                seq.append(tok)
                emitted += 1
                yield torch.tensor([tok], device=device)
                if tok in eos:
                    return
            drafter.accepted(len(seq))


def speculative_stream(draft: str | torch.nn.Module, draft_tokens: int = DEFAULT_DRAFT_TOKENS):  # noqa: ANN201
    """A `stream_ids`-shaped function (model, idx, max_new_tokens, **sampling) that decodes
    speculatively with `draft` ("ngram" or a model): what `generate_text(stream=...)` takes."""

    def stream(model, idx, max_new_tokens, **kwargs):  # noqa: ANN001, ANN202, ANN003
        return stream_speculative(model, idx, max_new_tokens, draft=draft,
                                  draft_tokens=draft_tokens, **kwargs)

    return stream


@torch.no_grad()
def generate_speculative(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         **kwargs) -> torch.Tensor:  # noqa: ANN003
    """idx (1, T) -> (1, T + new): `generate.generate`, decoded speculatively."""
    new = list(stream_speculative(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)
