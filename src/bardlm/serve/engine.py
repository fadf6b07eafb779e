"""The generation engine behind the server: continuous batching on one worker thread.

Generation is CPU-bound and the model is not safe to share between threads, so one worker
thread owns the model and runs a loop; the event loop only hands it jobs. Each loop turn:

  1. admit waiting jobs into free slots (a slot is one row of a static KV cache of
     `max_batch` rows x `context` positions, preallocated once and sized to the memory
     available: infer/budget.py; for a linear-attention or short-convolution layer, one fixed
     state, zeroed when a job takes the slot and when it leaves);
  2. drop jobs whose client went away (their slot is free at once);
  3. prefill: one pass over the next pieces of new jobs' prompts, oldest first, at most
     `prefill_chunk` tokens in all, so a long prompt delays the others by one chunk, not by
     its whole length, and short prompts arriving together are read together;
  4. one decode step for every job that is generating: a batch of one new token per job, each
     written at its own cache index and position (the static-shape step of infer/generate.py).

With a drafter (`--draft`), a turn in which one job alone is generating runs a speculative round
for it instead of step 4 (serve/speculate.py).

A job joins and leaves the batch at these token boundaries; each keeps its own sampling
settings, seed (its own generator), stop strings and token budget, so its tokens do not depend
on what else is running. At most `max_batch + max_queue` jobs are accepted (running + waiting);
one more is refused at once, so a busy server answers 503 instead of piling up work.

This module knows nothing about HTTP.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BardlmError
from ..eval.score import forward_logprobs
from ..infer.budget import CachePlan, available_memory, plan_cache, read_length
from ..infer.generate import TextStream, decode_step, encode_prompt, eval_mode
from ..infer.layouts import pack_rows
from ..infer.sampling import apply_repetition_penalty, check_sampling, is_greedy, sample
from ..nn.cache import StateCache
from ..tokenizers.base import check_ids
from .speculate import Speculator


@dataclass
class Job:
    """One completion request, as the worker sees it, and (once run) its result."""

    prompt: str
    max_tokens: int  # 0: score the prompt only (echo with logprobs)
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_k, top_p, seed, ...
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None  # called in the worker thread with each piece
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[int] | None = None  # a prompt sent as token ids (set by `check` otherwise)
    logprobs: int | None = None  # top-N alternatives per token; None: no logprobs
    echo: bool = False
    # Filled in by the worker:
    ids: list[int] = field(default_factory=list)  # generated token ids
    logprob_block: dict[str, Any] | None = None  # OpenAI's choices[i].logprobs
    prompt_tokens: int = 0
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" or "cancelled"


class _Running:
    """A job in a slot: where its tokens sit in the cache, and how to pick the next one."""

    def __init__(self, job: Job, slot: int, tokenizer: Any, future: Future,
                 device: torch.device) -> None:
        self.job, self.slot, self.future = job, slot, future
        self.ids = list(job.prompt_ids or [])  # prompt + generated so far
        self.n_prompt = len(self.ids)
        self.prefilled = 0  # prompt tokens already in the cache
        self.steps = 0  # tokens sampled (an EOS included)
        eos = getattr(tokenizer, "eos_ids", ())
        self.out = TextStream(tokenizer, job.stop, eos)
        seed = job.sampling.get("seed")
        # One generator per job, seeded as `generate_text` seeds its single row.
        self.gens = None if seed is None else [torch.Generator(device).manual_seed(seed)]

    @property
    def generating(self) -> bool:
        return self.prefilled == self.n_prompt


class Engine:
    """Runs completion jobs on a worker thread, up to `max_batch` at once and `max_queue` waiting.

    prefill_chunk: prompt tokens per prefill pass. compile: `torch.compile` the decode step
    (then every step runs all slots over a prefix of the cache of one of a few lengths:
    `read_length`). max_context: positions per slot (default: the model's context, or what
    half the memory available holds: `plan_cache`); memory: the bytes available (default:
    measured on the model's device); draft: a draft model (same tokenizer) or "ngram", to
    decode speculatively while one job generates (`Speculator`), with `draft_tokens` guesses.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_queue: int = 16,
                 max_batch: int = 1, prefill_chunk: int = 128, compile: bool = False,
                 max_context: int | None = None, memory: int | None = None,
                 draft: str | torch.nn.Module | None = None, draft_tokens: int = 4) -> None:
        if max_queue < 0:
            raise BardlmError(f"max_queue must be >= 0, got {max_queue}")
        if max_batch < 1:
            raise BardlmError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise BardlmError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.prefill_chunk, self.compile = max_batch, prefill_chunk, compile
        self.capacity = max_batch + max_queue  # running + waiting
        self.device = next(model.parameters()).device
        if max_batch > 1 and not compile:  # (a compiled step packs its own weights, or not)
            pack_rows(model, rows=16)  # fp32 CPU models: batched steps through oneDNN's kernel
        if memory is None:
            memory = available_memory(self.device)
        self.plan: CachePlan = plan_cache(model.config, max_batch, model.cache_dtype().itemsize,
                                          memory, max_context)
        self.context = self.plan.tokens  # positions per slot: prompt + completion at most
        self.cache = model.make_cache(max_batch, self.context)  # one row per slot, reused
        # Linear-attention (Qwen3.5) and short-convolution (LFM2) layers keep a fixed state per
        # slot in place of keys and values.
        self._states = [c for c in self.cache if isinstance(c, StateCache)]
        self._step = decode_step(model, compile)
        # Speculative rounds while one job generates (serve/speculate.py), or None.
        self.speculator = None if draft is None else Speculator(model, draft, draft_tokens,
                                                                 self.context, pack=not compile)
        self._lock = threading.Condition()  # guards everything below (event loop + worker)
        self._waiting: deque[tuple[Job, Future]] = deque()
        self._running: list[_Running] = []
        self._free = list(range(max_batch))
        self._stopping = False
        self.accepted = 0  # jobs accepted and not yet finished (running + waiting)
        self.tokens_generated = 0  # over the server's lifetime
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.peak_running = 0  # the largest batch so far
        self._worker = threading.Thread(target=self._loop, name="bardlm-generate", daemon=True)
        self._worker.start()

    @property
    def running(self) -> int:
        return len(self._running)

    # Validation (before a job is accepted; may run in any thread) ------------------------------
    def check(self, job: Job) -> None:
        """Raise `RequestError` for a job that cannot run: bad prompt, too long, bad sampling."""
        try:
            if job.prompt_ids is None:
                self._refuse_huge(job.prompt)
                job.prompt_ids = encode_prompt(self.tokenizer, job.prompt)
            check_ids(job.prompt_ids, self.model.config.vocab_size)
            ids = job.prompt_ids
        except BardlmError as e:
            raise RequestError(str(e), "prompt") from None
        room = self.context - len(ids)
        if room < 0 or (room == 0 and job.max_tokens > 0):
            raise RequestError(
                f"the prompt is {len(ids)} tokens but the server's context is {self.context}; "
                "shorten the prompt" + self._context_hint(), "prompt")
        if job.max_tokens > room:
            raise RequestError(
                f"max_tokens is {job.max_tokens} but the context of {self.context} tokens "
                f"leaves room for {room} after the {len(ids)}-token prompt; ask for at most {room}"
                + self._context_hint(), "max_tokens")
        s = job.sampling
        try:
            check_sampling(s.get("temperature", 1.0), s.get("top_k"), s.get("top_p"),
                           self.model.config.vocab_size, s.get("min_p"),
                           s.get("repetition_penalty", 1.0))
        except BardlmError as e:  # its message starts with the parameter's name
            name = str(e).split()[0]
            raise RequestError(str(e), name if name in s else None) from None
        job.prompt_tokens = len(ids)

    def _context_hint(self) -> str:
        """Where the context was cut below the model's: how to get more."""
        if self.context >= self.model.config.block_size:
            return ""
        return (f" (the server holds {self.context} of the model's {self.model.config.block_size} "
                "positions per slot: start it with a larger --max-context or a smaller --max-batch)")

    def _refuse_huge(self, prompt: str) -> None:
        """Refuse a prompt far longer than the context from its beginning alone: tokenising a
        1 MiB string costs far more than reading the first 32 characters per context token.
        (Twice the context in tokens leaves room for a last word split differently.)"""
        head = prompt[: 32 * self.context]
        if len(head) < len(prompt) and len(encode_prompt(self.tokenizer, head)) > 2 * self.context:
            raise RequestError(
                f"the prompt is far longer than the model's context of {self.context} tokens "
                f"(its first {len(head)} characters alone are more than {2 * self.context}); "
                "shorten the prompt", "prompt")

    # Queue --------------------------------------------------------------------------------
    def try_submit(self, job: Job) -> Future | None:
        """Queue a job; None (and nothing queued) when the server is full.

        A job not yet `check`ed is checked here (raising `RequestError`)."""
        if job.prompt_ids is None:
            self.check(job)
        future: Future = Future()
        with self._lock:
            if self.accepted >= self.capacity or self._stopping:
                return None
            self.accepted += 1
            self._waiting.append((job, future))
            self._lock.notify()
        return future

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": len(self._running), "queued": len(self._waiting),
                "capacity": self.capacity, "max_batch": self.max_batch,
                "peak_running": self.peak_running,
                "completed": self.completed, "cancelled": self.cancelled, "failed": self.failed,
                "tokens_generated": self.tokens_generated,
            }

    def shutdown(self) -> None:
        """Stop the worker: running and waiting jobs end as cancelled (their clients are gone)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._worker.join(timeout=30)

    # Worker --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            for r in admitted:
                if r.job.max_tokens == 0:  # scoring only: no slot work, no generation
                    self._finish(r, "length")
            for r in [r for r in self._running if r.job.cancel.is_set()]:
                self._finish(r, "cancelled")
            with torch.no_grad(), eval_mode(self.model):
                self._turn()
        for r in list(self._running):
            self._finish(r, "cancelled")
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job, future in waiting:
            self._finish_waiting(job, future)

    def _admit(self) -> list[_Running]:
        """Move waiting jobs into free slots (the lowest first: consecutive rows read as a view).
        Called with the lock held."""
        admitted = []
        for job, future in [w for w in self._waiting if w[0].cancel.is_set()]:
            self._waiting.remove((job, future))
            self._finish_waiting(job, future)
        while self._waiting and self._free:
            job, future = self._waiting.popleft()
            future.set_running_or_notify_cancel()
            r = _Running(job, self._free.pop(0), self.tokenizer, future, self.device)
            for c in self._states:  # a new request starts from a zero state
                c.clear(r.slot)
            self._running.append(r)
            admitted.append(r)
        self.peak_running = max(self.peak_running, len(self._running))
        return admitted

    def _turn(self) -> None:
        """One prefill pass for the jobs still reading their prompts, then one decode step."""
        prefilling = [r for r in self._running if not r.generating]
        if prefilling:  # the oldest first, as many as fit in one chunk's worth of tokens
            take, budget = [], self.prefill_chunk
            for r in prefilling:
                if take and min(r.n_prompt - r.prefilled, self.prefill_chunk) > budget:
                    break
                take.append(r)
                budget -= min(r.n_prompt - r.prefilled, self.prefill_chunk)
            self._guard(take, self._prefill)
        generating = sorted((r for r in self._running if r.generating), key=lambda r: r.slot)
        if generating:
            spec = self.speculator
            if spec is not None and spec.takes(generating):  # one job alone: speculate
                self._guard(generating, lambda rows: spec.decode(rows[0], self.cache, self._emit))
            else:
                self._guard(generating, self._decode)

    def _guard(self, rows: list[_Running], fn: Callable[[list[_Running]], None]) -> None:
        """Run fn(rows); an unexpected error fails those jobs (500s), not the server."""
        try:
            fn(rows)
        except Exception as e:  # noqa: BLE001
            # Reported to each job's client (a 500); the server and the other slots go on.
            for r in rows:
                if r in self._running:
                    self._fail(r, e)

    def _prefill(self, rows: list[_Running]) -> None:
        """Write the next chunk of each job's prompt into its slot; a job whose prompt is then
        complete samples its first token. One left-padded pass for all rows (`_prefill_pass`),
        or, for a model with state layers (linear attention, short convolutions), one unpadded
        pass per chunk length.

        Why unpadded: a pad would enter a linear layer's state, a sum over every token its row
        has seen, and its conv window, which must hold the inputs just before the chunk's first
        real token (the slot's conv state), not pads. Masking pads out of both would need a
        per-row shift of the conv input; rows of one length need no pad at all, and decode steps
        (one token per row, never padded) stay one batched pass. Prompts arriving together cost
        at most one pass per distinct length, a chunk's worth of tokens in all.
        """
        if not self._states:
            self._prefill_pass(rows)
            return
        by_length: dict[int, list[_Running]] = {}
        for r in rows:
            by_length.setdefault(min(r.n_prompt - r.prefilled, self.prefill_chunk), []).append(r)
        for group in by_length.values():
            self._prefill_pass(group)

    def _prefill_pass(self, rows: list[_Running]) -> None:
        """The next chunk of each job's prompt into its slot, all in one pass.

        The chunks are left-padded to one length T, so every row's last real token is in the
        last column (only that column's logits are computed). A pad's key must go somewhere
        harmless: the slot's last cache index, which is past every prompt token, hidden from
        the real queries by the mask, and rewritten before it is ever read. (A model with
        linear layers never gets here with pads: `_prefill`.)
        """
        takes = [min(r.n_prompt - r.prefilled, self.prefill_chunk) for r in rows]
        T = max(takes)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        cache_pos = torch.full((len(rows), T), self.context - 1)
        for b, (r, n) in enumerate(zip(rows, takes)):
            ids[b, T - n:] = torch.tensor(r.ids[r.prefilled:r.prefilled + n])
            cache_pos[b, T - n:] = torch.arange(r.prefilled, r.prefilled + n)
        ids, cache_pos = ids.to(self.device), cache_pos.to(self.device)
        length = max(r.prefilled + n for r, n in zip(rows, takes))
        view = [c.rows([r.slot for r in rows], length) for c in self.cache]
        logits, _ = self.model(ids, start_pos=cache_pos, cache=view, logits_rows=1)
        for r, n in zip(rows, takes):
            r.prefilled += n
        done = [b for b, r in enumerate(rows) if r.generating]  # whole prompts: a first token
        self._take_all([rows[b] for b in done], logits[done, -1])

    def _decode(self, rows: list[_Running]) -> None:
        """One new token for each generating job (rows, in slot order): (B, 1) ids at their own
        cache indices.

        The batch is a run of consecutive slots whenever it can be, so that every layer reads its
        keys and values as a view of the cache: rows that are not consecutive are gathered, a
        copy of each row's keys and values in every layer at every step. A slot in the run with
        no generating job (free, or still reading its prompt) gets a dummy token parked at its
        last cache index (past any prompt, never read unmasked, rewritten before it is ever
        read; a linear layer's state ignores it), and its logits are dropped.

        Eager, the run is from the lowest generating slot to the highest, when it holds no more
        dummies than jobs (a dummy costs one row of attention; a gather copies every job's
        keys and values, then attention reads them); a sparser batch is gathered. Attention
        reads as far as the furthest job. Compiled, every step has one of a few shapes: all
        `max_batch` slots, reading the shortest of the `read_length` buckets that holds the
        furthest job (at most twice what it needs).
        """
        furthest = max(len(r.ids) for r in rows)
        if self.compile:
            slots = list(range(self.max_batch))
            length = read_length(furthest, self.context)
        else:
            run = range(rows[0].slot, rows[-1].slot + 1)
            slots = list(run) if len(run) <= 2 * len(rows) else [r.slot for r in rows]
            length = furthest
        by_slot = {r.slot: r for r in rows}
        ids = [[by_slot[s].ids[-1] if s in by_slot else 0] for s in slots]
        pos = [[len(by_slot[s].ids) - 1 if s in by_slot else self.context - 1] for s in slots]
        picked = [i for i, s in enumerate(slots) if s in by_slot]  # the jobs' rows, in order
        ids = torch.tensor(ids, device=self.device)
        cache_pos = torch.tensor(pos, device=self.device)  # (B, 1)
        view = [c.rows(slots, length) for c in self.cache]
        self._take_all(rows, self._step(ids, cache_pos, view, None, None)[picked, -1])

    def _take_all(self, rows: list[_Running], logits: torch.Tensor) -> None:
        """The next token of each job in rows from its logits (len(rows), V): the greedy ones in
        one argmax (`_greedy`), the others sampled one by one."""
        for r, row, token in zip(rows, logits, self._greedy(rows, logits)):
            try:
                self._take(r, row, token)
            except Exception as e:  # noqa: BLE001
                # One job's failed sampling fails that job only.
                self._fail(r, e)

    @staticmethod
    def _greedy(rows: list[_Running], logits: torch.Tensor) -> list[int | None]:
        """The next token of every greedy job (no repetition penalty) among rows, from their
        logits (len(rows), V) in one argmax and one copy to Python; None for the others (they
        sample one by one: each has its own settings and generator)."""
        greedy = [i for i, r in enumerate(rows) if is_greedy(r.job.sampling.get("temperature", 1.0))
                  and r.job.sampling.get("repetition_penalty", 1.0) == 1.0]
        tokens: list[int | None] = [None] * len(rows)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                tokens[i] = t
        return tokens

    def _take(self, r: _Running, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample job r's next token from its logits (V,) (or take `token`, already picked) and
        pass its text on."""
        if token is None:
            s = r.job.sampling
            row, penalty = logits.float().unsqueeze(0), s.get("repetition_penalty", 1.0)
            if penalty != 1.0:  # the ids seen so far, as a tensor, only when they are needed
                row = apply_repetition_penalty(row, torch.tensor([r.ids], device=row.device), penalty)
            token = int(sample(row, s.get("temperature", 1.0), s.get("top_k"), s.get("top_p"),
                               s.get("min_p"), r.gens)[0])
        self._emit(r, token)

    def _emit(self, r: _Running, token: int) -> bool:
        """Job r's next token: pass its text on, finish the job at a stop or its budget.
        Returns whether r goes on generating."""
        r.steps += 1
        piece = r.out.push(token)
        if piece and r.job.on_text is not None:
            r.job.on_text(piece)
        if r.out.done:
            self._finish(r, "stop")
        elif r.steps >= r.job.max_tokens:
            self._finish(r, "length")
        else:
            r.ids.append(token)  # its keys go into the cache at the next decode step
            return True
        return False

    def _finish(self, r: _Running, reason: str) -> None:
        """Free r's slot and hand its result to the waiting request."""
        job = r.job
        job.finish_reason = reason
        try:
            if reason != "cancelled":
                piece = r.out.flush()
                if piece and job.on_text is not None:
                    job.on_text(piece)
                job.text = r.out.text
                job.ids = _ids_of_text(self.tokenizer, r.out.ids, job.text)
                if job.logprobs is not None:
                    job.logprob_block = logprob_block(self.model, self.tokenizer, job)
        except Exception as e:  # noqa: BLE001
            self._fail(r, e)
            return
        job.completion_tokens = len(r.out.ids)
        self._release(r, "cancelled" if reason == "cancelled" else "completed")
        r.future.set_result(job)

    def _fail(self, r: _Running, e: Exception) -> None:
        self._release(r, "failed")
        r.future.set_exception(e)

    def _release(self, r: _Running, outcome: str) -> None:
        with self._lock:
            self._running.remove(r)
            self._free.append(r.slot)
            for c in self._states:  # nothing of a finished request stays in its slot
                c.clear(r.slot)
            if self.speculator is not None:  # nor in the draft's cache
                self.speculator.forget(r)
            self._free.sort()
            self.accepted -= 1
            self.tokens_generated += len(r.out.ids)
            setattr(self, outcome, getattr(self, outcome) + 1)

    def _finish_waiting(self, job: Job, future: Future) -> None:
        """A job that never got a slot: its client left, or the server is stopping."""
        job.finish_reason = "cancelled"
        with self._lock:
            self.accepted -= 1
            self.cancelled += 1
        if future.set_running_or_notify_cancel():
            future.set_result(job)


def _ids_of_text(tokenizer: Any, ids: list[int], text: str) -> list[int]:
    """The generated ids that make up `text` (a stop string cuts the text, not the ids)."""
    while ids and not text.startswith(tokenizer.decode(ids)):
        ids = ids[:-1]
    return ids


def logprob_block(model: torch.nn.Module, tokenizer: Any, job: Job) -> dict[str, Any]:
    """OpenAI's `logprobs` of a completion: per token its text, log-probability, the top
    `job.logprobs` alternatives and its character offset in the returned text. With echo the
    prompt's tokens come first, the very first with null (nothing predicts it).

    One forward pass over prompt + completion (at most the context) scores every token with
    the model's own distribution (before temperature or top-k/p)."""
    prompt = job.prompt_ids or []
    seq = prompt + job.ids
    keep = 0 if job.echo else len(prompt)  # the first token returned
    logp = forward_logprobs(model, torch.tensor([seq[:-1] or seq[:1]]))[0]  # (T, V)
    n_top = job.logprobs or 0
    tokens, token_lp, top, offsets = [], [], [], []
    for t in range(keep, len(seq)):
        tokens.append(tokenizer.decode([seq[t]]))
        offsets.append(len(tokenizer.decode(seq[keep:t])))  # into the returned text
        if t == 0:
            token_lp.append(None)
            top.append(None)
            continue
        row = logp[t - 1]
        token_lp.append(float(row[seq[t]]))
        alts = {}
        if n_top:
            values, idx = row.topk(min(n_top, row.numel()))
            alts = {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, idx)}
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top,
            "text_offset": offsets}


class RequestError(BardlmError):
    """A request the engine refuses; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
