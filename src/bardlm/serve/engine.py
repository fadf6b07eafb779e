"""The generation engine behind the server: one worker thread and a bounded queue.

Generation is CPU-bound and the model is not safe to share between threads, so a single worker
thread runs one request at a time while the event loop keeps answering HTTP. At most
`1 + max_queue` requests are accepted (running + waiting); one more is refused at once, so a busy
server answers 503 instead of piling up work it cannot finish. A request's `cancel` event stops
its generation within one token (a client that went away), and its slot is freed when the
worker lets go of it.

This module knows nothing about HTTP: it is the library's `generate_text` plus the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BardlmError
from ..eval.score import forward_logprobs
from ..infer.generate import encode_prompt, generate_text
from ..infer.sampling import check_sampling
from ..tokenizers.base import check_ids


class Cancelled(Exception):
    """Raised inside the worker to stop a job whose client has gone away."""


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


class _Tap:
    """A tokenizer seen through a keyhole: counts generated tokens and stops cancelled jobs.

    `generate_text` decodes the growing list of new ids once per generated token, so the
    longest list it has decoded is the number of tokens generated, and `decode` is a hook that
    runs every step: the place to notice a cancellation without touching the generation loop.
    """

    def __init__(self, tokenizer: Any, cancel: threading.Event) -> None:
        self._tok = tokenizer
        self._cancel = cancel
        self.n_generated = 0
        self.ids: list[int] = []
        self.last_text = ""

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return self._tok.encode(text, **kwargs)

    def decode(self, ids: list[int]) -> str:
        if self._cancel.is_set():
            raise Cancelled
        self.n_generated = max(self.n_generated, len(ids))
        self.ids = list(ids)
        self.last_text = self._tok.decode(ids)
        return self.last_text

    def __getattr__(self, name: str) -> Any:  # vocab_size, kind, ...
        return getattr(self._tok, name)


class Engine:
    """Runs completion jobs one at a time on a worker thread, with at most `max_queue` waiting."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise BardlmError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.capacity = 1 + max_queue  # one running + the waiting ones
        self.block_size = model.config.block_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bardlm-generate")
        self._lock = threading.Lock()  # guards the counters below (event loop + worker thread)
        self.accepted = 0  # jobs accepted and not yet finished (running + waiting)
        self.running = 0
        self.tokens_generated = 0  # over the server's lifetime
        self.completed = 0
        self.cancelled = 0

    # Validation (on the event loop, before a job is accepted) ---------------------------------
    def check(self, job: Job) -> None:
        """Raise `RequestError` for a job that cannot run: bad prompt, too long, bad sampling."""
        try:
            if job.prompt_ids is None:
                job.prompt_ids = encode_prompt(self.tokenizer, job.prompt)
            check_ids(job.prompt_ids, self.model.config.vocab_size)
            ids = job.prompt_ids
        except BardlmError as e:
            raise RequestError(str(e), "prompt") from None
        room = self.block_size - len(ids)
        if room < 0 or (room == 0 and job.max_tokens > 0):
            raise RequestError(
                f"the prompt is {len(ids)} tokens but the model's context is {self.block_size}; "
                "shorten the prompt", "prompt")
        if job.max_tokens > room:
            raise RequestError(
                f"max_tokens is {job.max_tokens} but the context of {self.block_size} tokens "
                f"leaves room for {room} after the {len(ids)}-token prompt; ask for at most {room}",
                "max_tokens")
        s = job.sampling
        try:
            check_sampling(s.get("temperature", 1.0), s.get("top_k"), s.get("top_p"),
                           self.model.config.vocab_size, s.get("min_p"),
                           s.get("repetition_penalty", 1.0))
        except BardlmError as e:  # its message starts with the parameter's name
            name = str(e).split()[0]
            raise RequestError(str(e), name if name in s else None) from None
        job.prompt_tokens = len(ids)

    # Queue --------------------------------------------------------------------------------
    def try_submit(self, job: Job) -> Future | None:
        """Queue a job; None (and nothing queued) when the queue is full."""
        with self._lock:
            if self.accepted >= self.capacity:
                return None
            self.accepted += 1
        future = self._executor.submit(self._run, job)
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: Future) -> None:
        with self._lock:
            self.accepted -= 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": self.running, "queued": self.accepted - self.running,
                "capacity": self.capacity, "completed": self.completed,
                "cancelled": self.cancelled, "tokens_generated": self.tokens_generated,
            }

    def shutdown(self) -> None:
        """Drop waiting jobs and wait for the running one (its clients are gone too)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    # Worker --------------------------------------------------------------------------------
    def _run(self, job: Job) -> Job:
        """Generate the job's completion (in the worker thread); fills in its result fields."""
        if job.cancel.is_set():  # its client left while it waited
            job.finish_reason = "cancelled"
            with self._lock:
                self.cancelled += 1
            return job
        tap = _Tap(self.tokenizer, job.cancel)
        with self._lock:
            self.running += 1
        try:
            if job.max_tokens > 0:
                job.text = generate_text(self.model, tap, job.prompt, max_new_tokens=job.max_tokens,
                                         stop=job.stop, on_text=job.on_text,
                                         prompt_ids=job.prompt_ids, **job.sampling)
            stopped = any(s in tap.last_text for s in job.stop if s)
            job.finish_reason = "stop" if stopped or tap.n_generated < job.max_tokens else "length"
            job.ids = _ids_of_text(self.tokenizer, tap.ids, job.text)
            if job.logprobs is not None:
                job.logprob_block = logprob_block(self.model, self.tokenizer, job)
        except Cancelled:
            job.finish_reason = "cancelled"
        finally:
            job.completion_tokens = tap.n_generated
            with self._lock:
                self.running -= 1
                self.tokens_generated += tap.n_generated
                if job.finish_reason == "cancelled":
                    self.cancelled += 1
                else:
                    self.completed += 1
        return job


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
