"""Autoregressive generation: a prefill pass over the prompt, then one token per step.

With a KV cache each step feeds only the newest token at `start_pos`; without one it re-reads
the whole window. Both give the same tokens (a test holds them equal). Once a sequence is longer
than the context, the window slides: the last `block_size` tokens are re-read and the cache is
rebuilt from them, exactly what the uncached path does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from ..errors import BardlmError
from ..nn.moe import stack_experts
from .budget import available_memory, context_window, plan_cache, read_length
from .sampling import apply_repetition_penalty, check_sampling, sample


def check_prompt(n_prompt: int, max_new_tokens: int) -> None:
    if n_prompt == 0:
        raise BardlmError("the prompt is empty; give at least one token of prompt")
    if max_new_tokens <= 0:
        raise BardlmError(f"max_new_tokens must be positive, got {max_new_tokens}")


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (ids (B, L), real (B, L) bool), padded on the left.

    Left padding keeps every row's newest token in the last column, so one decode step appends
    one column for all rows; `real` marks the tokens that are not padding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BardlmError("every prompt needs at least one token; drop the empty ones")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), L, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        real[b, L - len(p):] = True
    return ids, real


def _prefill_inputs(
    real: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, 1, T, T) and positions (B, T) for a left-padded window with `real` (B, T).

    A row's positions count only its real tokens, so padding does not shift them. Queries see
    real keys (causality is added by attention); a pad query also sees itself, so its softmax
    row is never empty (an all -inf row would put NaN into the cache).
    """
    T = real.shape[1]
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    eye = torch.eye(T, dtype=torch.bool, device=real.device)
    return real[:, None, None, :] | eye, positions


def _generators(seed: int | None, batch: int, device: torch.device) -> list[torch.Generator] | None:
    """One generator per row, seeded seed + row: a row samples the same tokens alone or batched."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed + b) for b in range(batch)]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with every module of `model` in eval mode (no dropout), then put back the
    modules that were training, one by one (a partly frozen model keeps its mix)."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


@torch.no_grad()
def stream_ids(
    model: torch.nn.Module,
    idx: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    max_context: int | None = None,
    eos_ids: Iterable[int] = (),
    compile: bool | str = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time.

    The model runs in eval mode (dropout off) within each step and is back in its own mode
    between steps: a model in the middle of training samples what it would in eval mode.

    idx: prompts (B, T), or a list of B prompts of different lengths (left-padded here; every
    row then gets the tokens it would get alone). seed: row b samples with seed + b.
    max_context: window of rotary models (default `block_size`); past it the window slides.
    eos_ids: ids that end a row. The EOS is yielded; a finished row then repeats its EOS, and the
    stream ends once every row has finished (or after max_new_tokens).
    compile: run the decode step through `torch.compile` (its shapes never change: see
    `decode_step`); the first call compiles (seconds to minutes), later ones reuse it. A
    string is a `torch.compile` mode; True on a CUDA device means "reduce-overhead" (the step
    replayed as a CUDA graph).
    """
    cfg = model.config
    device = next(model.parameters()).device
    if compile is True and device.type == "cuda":
        # A B=1 step on a GPU is launch-bound: replayed as one CUDA graph it ran 4.4x the plain
        # compiled step's tokens/s on an H200 (docs/benchmarks.md, "GPU").
        compile = "reduce-overhead"
    if isinstance(idx, torch.Tensor):
        real = torch.ones_like(idx, dtype=torch.bool)
    else:
        idx, real = left_pad(idx)
    idx, real = idx.to(device), real.to(device)
    check_prompt(idx.shape[1], max_new_tokens)
    check_sampling(temperature, top_k, top_p, cfg.vocab_size, min_p, repetition_penalty, seed)
    gens = _generators(seed, idx.shape[0], device)
    window = context_window(cfg, max_context)
    padded = not bool(real.all())
    seq = idx
    cache = None
    if use_cache:
        cache_len = min(window, idx.shape[1] + max_new_tokens)
        if hasattr(model, "cache_dtype"):  # refuse a cache the memory cannot hold, in one line
            plan_cache(cfg, idx.shape[0], model.cache_dtype().itemsize, available_memory(device),
                       max_context=cache_len)
        cache = model.make_cache(idx.shape[0], cache_len)
        if compile and device.type == "cuda":  # CUDA graphs may write the buffers in place
            for b in (b for c in cache for b in c.buffers()):
                torch._dynamo.mark_static_address(b)
    rows = list(range(idx.shape[0]))
    cached = 0  # cache slots in use
    cache_pos = None  # (1,) the cache index of the next decode step, on the device
    # filled[b, j]: cache index j of row b holds a real token (not padding). Static (B, S).
    filled = torch.zeros(idx.shape[0], cache[0].max_len, dtype=torch.bool, device=device) if cache else None
    step = decode_step(model, compile)
    last = seq[:, -1:]  # the newest column; a fresh (B, 1) tensor after each step
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)  # rows past their EOS
    for _ in range(max_new_tokens):
        with eval_mode(model):  # no dropout while sampling, whatever mode the model is in
            if cache is not None and 0 < cached < cache[0].max_len and not compile:
                # Eager: the caches' own int-indexed path. One new token reads the filled
                # prefix, so there is no causal mask to build in each layer (only the pad mask).
                filled[:, cached] = True
                mask = filled[:, None, None, : cached + 1] if padded else None
                pos = (real[:, -cached - 1:].sum(1, keepdim=True) - 1) if padded else None
                logits = model(last, start_pos=cached, cache=cache, mask=mask, positions=pos,
                               logits_rows=1)[0]
                cached += 1
            elif cache is not None and 0 < cached < cache[0].max_len:
                # The static-shape step, compiled: one new column written at cache index
                # `cached`; pad slots stay hidden by the real-key mask.
                filled[:, cached] = True
                # Attention reads the filled prefix in one of a few bucket lengths
                # (`read_length`), so the step compiles a bounded number of times.
                length = read_length(cached + 1, cache[0].max_len)
                mask = filled[:, None, None, :length] if padded else None
                pos = (real[:, -cached - 1:].sum(1, keepdim=True) - 1) if padded else None
                if cache_pos is None:  # made once, then advanced on the device: a tensor made
                    cache_pos = torch.tensor([cached], device=device)  # from a list waits for the GPU
                # `last`, not seq[:, -1:]: a column of the growing `seq` has a new stride every
                # step, and a compiled step would recompile for each.
                logits = step(last, cache_pos, [c.rows(rows, length) for c in cache], mask, pos)
                cached += 1
                cache_pos += 1
            else:  # first step, no cache, or the cache is full: read the (cropped) window whole
                ctx, ctx_real = seq[:, -window:], real[:, -window:]
                mask, pos = _prefill_inputs(ctx_real) if padded else (None, None)
                # Only the last row is sampled from: no (B, T, V) logits for the prompt.
                logits, _ = model(ctx, cache=cache, mask=mask, positions=pos, logits_rows=1)
                cached, cache_pos = ctx.shape[1], None
                if filled is not None:
                    filled.zero_()
                    filled[:, :cached] = ctx_real
        seen = torch.where(real, seq, seq[:, -1:]) if padded else seq  # pads count as no token
        logits = apply_repetition_penalty(logits[:, -1, :].float(), seen, repetition_penalty)
        nxt = sample(logits, temperature, top_k, top_p, min_p, gens)
        if len(eos):
            nxt = torch.where(done, eos[0], nxt)  # a finished row only repeats its EOS
            done |= torch.isin(nxt, eos)
        last = nxt.unsqueeze(1)  # (B, 1), strides (1, 1) every step
        seq = torch.cat([seq, last], dim=1)
        real = torch.cat([real, real.new_ones(real.shape[0], 1)], dim=1)
        yield nxt
        if bool(done.all()):
            return


def decode_step(model: torch.nn.Module, compile: bool | str = False):  # noqa: ANN201
    """The static-shape decode step, `step(ids, cache_pos, cache, mask, positions) -> logits`.

    ids (B, T) new tokens; cache_pos (T,) or (B, T) the cache indices they are written at;
    cache: the per-layer caches (or `SlotView`s); mask (B, 1, T|1, S) real keys, or None;
    positions (B, T) or None (= cache_pos). Returns the last position's logits (B, 1, V).
    Every shape is fixed by the batch and the cache size, never by how far decoding has got,
    so under `compile=True` the step is compiled once per (batch, cache) shape (gpt-fast's
    recipe). The compiled function is kept on the model and reused. `compile` may name a
    `torch.compile` mode ("reduce-overhead" replays the step as one CUDA graph).
    """

    def step(ids, cache_pos, cache, mask, positions):  # noqa: ANN001, ANN202
        return model(ids, start_pos=cache_pos, cache=cache, mask=mask, positions=positions,
                     logits_rows=1)[0]

    if not compile:
        return step
    # A mixture of experts reads its chosen experts from stacked weights (nn/moe.py,
    # `MoE._few_tokens_stacked`), so the step compiles as one graph. Re-checked on every call:
    # a parameter replaced since (say, by `model.to`) is stacked anew.
    stack_experts(model)
    mode = compile if isinstance(compile, str) else None
    steps = model.__dict__.setdefault("_compiled_steps", {})  # plain attribute, not a Module's
    if mode not in steps:
        steps[mode] = torch.compile(step, dynamic=False, mode=mode)
    return steps[mode]


@torch.no_grad()
def generate(
    model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs  # noqa: ANN003
) -> torch.Tensor:
    """idx (B, T) -> (B, T + max_new_tokens): the prompts followed by their continuations
    (fewer columns when every row has reached one of `eos_ids`)."""
    new = list(stream_ids(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, **kwargs  # noqa: ANN003
) -> list[list[int]]:
    """Continue prompts of different lengths in one batch: each row's new ids, as a list
    (each ending before its first id in `eos_ids`, when given)."""
    new = torch.stack(list(stream_ids(model, prompts, max_new_tokens, **kwargs)), dim=1)
    eos = set(kwargs.get("eos_ids", ()))
    rows = new.tolist()
    return [next((row[:i] for i, t in enumerate(row) if t in eos), row) for row in rows]


def encode_prompt(tokenizer, prompt: str) -> list[int]:  # noqa: ANN001
    """Prompt ids, failing on text the vocabulary cannot express (never a silent <unk>).

    Starts with the tokenizer's BOS when it asks for one (`add_bos`: Llama), once even if the
    text already begins with it.
    """
    if not prompt:
        raise BardlmError("the prompt is empty; pass --prompt with some text")
    try:
        ids = tokenizer.encode(prompt, strict=True)
    except TypeError:  # tokenizers without a strict mode cover every string
        ids = tokenizer.encode(prompt)
    bos = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def generate_text(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    prompt: str,
    max_new_tokens: int = 200,
    stop: list[str] | None = None,
    on_text: Callable[[str], None] | None = None,
    prompt_ids: list[int] | None = None,
    stream: Callable[..., Iterator[torch.Tensor]] | None = None,
    **kwargs,  # noqa: ANN003
) -> str:
    """The continuation of `prompt` as text; `on_text` receives pieces as they are decoded.

    Generation ends at the tokenizer's EOS (`eos_ids`, from a Hugging Face directory) or at the
    first stop string; neither is included. Text that might be the start of a stop string is
    held back until it is known not to be. `stream`: what produces the ids, `stream_ids` by
    default (`speculative.speculative_stream` gives one that decodes speculatively).
    """
    ids = encode_prompt(tokenizer, prompt) if prompt_ids is None else prompt_ids  # ids: as given
    window = context_window(model.config, kwargs.get("max_context"))
    if len(ids) > window:
        raise BardlmError(
            f"the prompt is {len(ids)} tokens, longer than the context of {window}; shorten it"
        )
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos_ids = (*getattr(tokenizer, "eos_ids", ()), *kwargs.pop("eos_ids", ()))
    out = TextStream(tokenizer, stop, eos_ids)
    for nxt in (stream or stream_ids)(model, idx, max_new_tokens, eos_ids=eos_ids, **kwargs):
        piece = out.push(int(nxt[0]))
        if on_text is not None and piece:
            on_text(piece)
        if out.done:
            break
    piece = out.flush()
    if on_text is not None and piece:
        on_text(piece)
    return out.text


class TextStream:
    """Generated ids in, text pieces out, for one sequence.

    `push(id)` returns the text that is now safe to show; `done` turns true at an EOS id (not
    included) or at the first stop string (the text is cut before it). Text that might be the
    start of a stop string, or an incomplete UTF-8 sequence from a byte-level tokenizer, is held
    back until it is known; `flush()` returns what is left once generation ends.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, eos_ids: Iterable[int] = ()) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.eos_ids = set(eos_ids)
        self.ids: list[int] = []  # generated ids, EOS excluded
        self.text = ""
        self.emitted = 0  # characters of `text` already returned
        self.done = False
        self.stopped = False  # ended by a stop string

    def push(self, token_id: int) -> str:
        if self.done:
            return ""
        if token_id in self.eos_ids:
            self.done = True
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.text, self.done, self.stopped = text[:cut], True, True
            return ""
        self.text = text
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        safe = len(text) - hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from a byte-level tokenizer
            safe = min(safe, len(text) - 1)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def flush(self) -> str:
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def interactive(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    lines: Iterable[str],
    emit: Callable[[str], None],
    prompt_marker: Callable[[], None] | None = None,
    **kwargs,  # noqa: ANN003
) -> int:
    """Continue each non-empty line of `lines` with the same loaded model; returns how many.

    A bad prompt (say, a character the vocabulary lacks) is reported on stderr and skipped, so
    one typo does not end the session.
    """
    import sys

    n = 0
    if prompt_marker:
        prompt_marker()
    for line in lines:
        prompt = line.rstrip("\r\n")
        if prompt:
            try:
                generate_text(model, tokenizer, prompt, on_text=emit, **kwargs)
                n += 1
            except BardlmError as e:
                print(f"bardlm: error: {e}", file=sys.stderr)
            emit("\n")
        if prompt_marker:
            prompt_marker()
    return n
