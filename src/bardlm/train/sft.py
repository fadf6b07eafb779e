"""Supervised finetuning on conversations: chat JSONL -> (ids, assistant-only targets) -> Loop.

Data: one conversation per line, {"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}. Each conversation is rendered with the model's chat template
(`infer.chat`) and tokenized whole; a token's target is the next token when an assistant wrote
that next token, else -1 (ignored by the loss). So the loss counts assistant tokens only: the
model learns to answer, not to predict its users.

Batches: conversations padded on the right to the longest in the batch (targets -1 on the
padding). Attention is causal, so a real token never sees the padding after it, and one row is
one conversation: nothing attends across examples. Validation: whole held-out conversations.
Losses, in training and in validation, are means over target tokens, never means of per-batch
means: a step's gradient is the same whatever grad_accum and the number of processes.

Training is `loop.Loop` (the one optimizer step) through `distributed.Parallel` (compile, and
DDP or FSDP2 under torchrun, as pretraining), saved and resumed by `state.RunState`; with
LoRA (`nn.lora`) only the adapters train and only they are saved (`io.adapter`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import BardlmError
from ..infer.chat import ChatTemplate, check_messages, encode_chat, prepare_vocab
from ..infer.device import resolve_device
from ..infer.qlora import quantize_base
from ..io.adapter import load_base
from ..io.checkpoint import METRICS_FILE
from ..io.load import read_meta
from ..io.metadata import template_for
from ..nn.lora import TARGETS, apply_lora, count_trainable
from ..nn.resize import resize_vocab
from ..progress import progress_bar, show_progress
from .distributed import Dist, Parallel
from .loop import Diverged, Loop, autocast, count_targets, evaluate
from .memory import configure as configure_memory
from .speed import describe as describe_speed
from .speed import flops_per_token, speed
from .state import RunState, StopSignals, check_plan, diverged, interrupted, resume_command


# Data ---------------------------------------------------------------------------------------
def jsonl_rows(path: str | Path, what: str) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed row) for each non-blank line of a JSONL file of `what`; a missing
    file or a line that is not JSON is a one-line error naming file:line."""
    path = Path(path)
    if path.is_dir():
        raise BardlmError(f"--data {path} is a folder; pass a .jsonl file of {what}")
    if not path.is_file():
        raise BardlmError(f"--data {path} does not exist; pass a .jsonl file of {what}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BardlmError(f"{where}: not UTF-8 (bad byte at column {e.start + 1}); "
                                  "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BardlmError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield where, row


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a chat JSONL file; a bad line is a one-line error naming file:line."""
    return [messages for _, messages in read_placed_chat_jsonl(path)]


def read_placed_chat_jsonl(path: str | Path) -> list[tuple[str, list[dict[str, str]]]]:
    """(file:line, conversation) for each conversation of a chat JSONL file."""
    convs = []
    for where, row in jsonl_rows(path, "conversations"):
        if not isinstance(row, dict) or "messages" not in row:
            raise BardlmError(f'{where}: expected an object {{"messages": [...]}}')
        messages = check_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise BardlmError(f"{where}: no assistant message, so nothing to learn from")
        convs.append((where, messages))
    if not convs:
        raise BardlmError(f"{path} holds no conversations")
    return convs


def target_row(ids: list[int], mine: list[bool], block_size: int) -> tuple[torch.Tensor | None, bool]:
    """(row (2, L), was it cut?): ids and targets (the next id where the assistant wrote it,
    else -1), cut to L <= block_size + 1; None when no assistant token is left."""
    cut = len(ids) > block_size + 1
    ids, mine = ids[: block_size + 1], mine[: block_size + 1]
    targets = [t if m else -1 for t, m in zip(ids[1:], mine[1:])] + [-1]
    if not any(t >= 0 for t in targets):
        return None, cut
    return torch.tensor([ids, targets], dtype=torch.long), cut


def encode_examples(convs: list[list[dict[str, str]]], template: ChatTemplate, tokenizer: Any,
                    block_size: int, where: list[str] | None = None) -> tuple[list[torch.Tensor], int]:
    """Each conversation as one row (2, L): its ids and its targets (next id, or -1 where the
    next id is not the assistant's). L <= block_size + 1: longer conversations are cut (their
    count is returned); one with no assistant token left is dropped. where: each conversation's
    place (file:line), named when its text cannot be encoded."""
    rows, n_cut = [], 0
    for i, messages in enumerate(convs):
        try:
            ids, mine = encode_chat(template, tokenizer, messages)
        except BardlmError as e:
            if where is None:
                raise
            raise BardlmError(f"{where[i]}: {e}") from None
        row, cut = target_row(ids, mine, block_size)
        n_cut += cut
        if row is not None:
            rows.append(row)
    return rows, n_cut


def split_conversations(convs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a fixed random `val_fraction` of whole conversations held out."""
    if len(convs) < 2:
        raise BardlmError("finetuning needs at least 2 conversations (one is held out for validation)")
    order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(len(convs) * val_fraction)), len(convs) - 1)
    return [convs[i] for i in order[n_val:]], [convs[i] for i in order[:n_val]]


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (2, L_i) -> x (B, L), y (B, L): x = ids[:-1], y = targets[:-1], padded on the
    right with id 0 and target -1."""
    L = max(r.shape[1] for r in rows) - 1
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = r.shape[1] - 1
        x[b, :n], y[b, :n] = r[0, :-1], r[1, :-1]
    return x, y


class ChatBatches:
    """Batches of examples in a fresh random order every epoch, a pure function of
    (seed, step, micro): resuming needs only the step. `collate` makes the picked examples
    one batch (default: conversations padded by `pad_rows`)."""

    def __init__(self, rows: list[Any], seed: int, collate: Callable[[list[Any]], Any] | None = None) -> None:
        if not rows:
            raise BardlmError("no training conversation has an assistant token within the context")
        self.rows, self.seed, self.collate = rows, seed, collate or pad_rows

    def batch(self, step: int, micro: int, batch_size: int, n_micro: int, rank: int = 0,
              world: int = 1) -> Any:
        """One micro-batch of one rank (by default (x, y), each (batch_size, L)): rank r of w
        takes the r-th slice of the global micro-batch, so w ranks see what one process with a
        w times larger batch_size sees."""
        first = ((step * n_micro + micro) * world + rank) * batch_size
        picked = []
        for s in range(first, first + batch_size):
            epoch, i = divmod(s, len(self.rows))
            perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            picked.append(self.rows[int(perm[i])])
        return self.collate(picked)


def val_batches(rows: list[torch.Tensor], batch_size: int):  # noqa: ANN201
    for i in range(0, len(rows), batch_size):
        yield pad_rows(rows[i : i + batch_size])


# The run ------------------------------------------------------------------------------------
@dataclass
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    base_dtype: str = "fp32"  # the frozen base's weights: "int8" is QLoRA

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise BardlmError(f"--lora-rank must be a positive integer, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise BardlmError(f"--lora-alpha must be a positive finite number, got {self.alpha} "
                              "(default 2 x rank)")


class Finetuner:
    """A finetuning run: base model + chat data -> `out` (a checkpoint, or a LoRA adapter).

    Preference tuning (`train.dpo`) and RL (`train.grpo`) are subclasses: they read other data
    (`load_data`), compute another loss (`step_loss`) and evaluate other things
    (`eval_metrics`), on the same model set-up, `Loop`, `Parallel`, `RunState` and Ctrl-C
    handling.
    """

    #: Weigh micro-batches by their target tokens (a mean over tokens); False: all alike, for
    #: losses that are already a mean over sequences (DPO, GRPO).
    token_weighted = True

    def __init__(self, init_from: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig,
                 lora: LoRASpec | None = None, log: Callable[[str], None] = print,
                 resume: bool = False, progress: bool = False, dist: Dist | None = None) -> None:
        self.init_from, self.data, self.out, self.cfg, self.lora = Path(init_from), Path(data), Path(out), cfg, lora
        # "auto" (or a device this machine lacks: one line) becomes the device itself.
        self.cfg = cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))
        self.dist = dist if dist is not None else Dist.from_env(cfg.device)
        self.log = log if self.dist.is_main else (lambda msg: None)  # only rank 0 speaks
        self.progress, self.history = show_progress(progress and self.dist.is_main), []
        if cfg.fsdp and lora is not None:
            raise BardlmError("fsdp with --lora-rank is not supported (the adapter is small): drop fsdp (DDP)")
        torch.manual_seed(cfg.seed)  # the same initial weights (and LoRA adapters) on every rank
        self.device = self.dist.device(cfg.device)
        model, tokenizer = load_base(self.init_from)
        self.template = template_for(self.init_from, tokenizer)
        tokenizer, added = prepare_vocab(self.template, tokenizer)
        self.tokenizer = tokenizer
        self.model = resize_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size))
        self.load_data()  # first: bad data is the one line said, before any note
        if added:
            self.log(f"the chat template adds {added} token(s) to the vocabulary")
        if lora is not None:
            grew = ("transformer.wte.weight",) + (() if self.model.config.tie_embeddings else ("lm_head.weight",))
            # QLoRA: the frozen base in int8 or int4 (the embedding in int8, unless rows were added)
            quantize_base(self.model, lora.base_dtype, embeddings=not added)
            apply_lora(self.model, lora.rank, lora.alpha, lora.targets, grew if added else ())
        self.model.to(self.device).train()
        configure_memory(self.model, cfg)  # activation checkpointing, chunked loss
        self.prepare()
        self.trainable, self.total = count_trainable(self.model)
        self.flops_per_token = flops_per_token(self.model)
        if self.dist.enabled:
            torch.manual_seed(cfg.seed + 1000 * self.dist.rank)  # own dropout masks per rank
        self.signals, self._tokens = StopSignals(), 0
        self.parallel = Parallel(self.model, cfg, self.dist, self.device,
                                 stop=lambda: self.signals.signum is not None)
        self.loop = Loop(self.model, cfg, forward=self.step_loss, grad_sync=self.parallel.grad_sync,
                         reduce=self.parallel.reduce, device=self.device,
                         targets=count_targets if self.token_weighted else None,
                         all_sum=self.dist.all_reduce_sum, world=self.dist.world)
        self.state = RunState(self.out, self.model, self.loop.optimizer, tokenizer, self.dist, self.device,
                              cfg.fsdp, self.log, trainable_only=lora is not None)
        if resume:
            self.resume()

    # What a subclass changes ------------------------------------------------------------------
    def load_data(self) -> None:
        """Read and encode `self.data`: sets `batches`, `n_train`, `n_val` (and `val_rows`)."""
        placed = read_placed_chat_jsonl(self.data)
        train, val = split_conversations(placed, self.cfg.val_fraction, self.cfg.seed)
        T = self.model.config.block_size

        def encode(part: list[tuple[str, list[dict[str, str]]]]) -> tuple[list[torch.Tensor], int]:
            return encode_examples([m for _, m in part], self.template, self.tokenizer, T, [w for w, _ in part])

        train_rows, cut = encode(train)
        self.val_rows, cut_val = encode(val)
        if cut + cut_val:
            self.log(f"note: {cut + cut_val} conversation(s) longer than the context ({T}) were cut")
        if not self.val_rows:
            raise BardlmError("no held-out conversation has an assistant token within the context")
        self.batches = ChatBatches(train_rows, self.cfg.seed)
        self.n_train, self.n_val = len(train_rows), len(self.val_rows)

    def prepare(self) -> None:
        """Called once the model is on its device, before training or resuming (the weights are
        still the starting model's): e.g. the reference log-probabilities of DPO."""

    def step_loss(self, *batch: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """What `Loop.train_step` calls on one micro-batch: (anything, loss). Train through
        `self.parallel.forward` (compiled, DDP/FSDP-wrapped), not `self.model`."""
        return self.parallel.forward(*batch)

    def eval_metrics(self) -> dict[str, float]:
        """The held-out figures logged every eval_interval steps."""
        return {"val_loss": self.val_loss()}

    def describe(self, row: dict[str, Any]) -> str:
        return (f"step {row['step']}: train {row['train_loss']:.4f} val {row['val_loss']:.4f}, "
                f"grad norm {row['grad_norm']:.3g}, {describe_speed(row)}")

    def after_record(self) -> None:
        """Called after each evaluation is saved (e.g. to draw a plot)."""

    #: The command that runs this kind of tuning, and the flags a resumed run must repeat.
    command = "finetune"

    def run_flags(self) -> list[str]:
        """The `bardlm <command>` flags that a resumed run must repeat (the rest is saved)."""
        flags = ["--init-from", str(self.init_from), "--data", str(self.data)]
        if self.lora is not None:
            flags += ["--lora-rank", str(self.lora.rank), "--lora-alpha", f"{self.lora.alpha:g}",
                      "--lora-targets", *self.lora.targets]
            if self.lora.base_dtype != "fp32":
                flags += ["--base-dtype", self.lora.base_dtype]
        return flags

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "init_from": str(self.init_from.resolve()), "data": str(self.data),
            "train": dataclasses.asdict(self.cfg), "tokenizer": self.tokenizer.kind,
            "world_size": self.dist.world,
        }
        # The base's special tokens and generation defaults, with the template trained here.
        base = read_meta(self.init_from, self.tokenizer)
        base.chat_template = self.template
        meta.update(base.to_checkpoint())
        if self.lora is not None:
            train_also = [n for n, p in self.model.named_parameters()
                          if p.requires_grad and ".lora_" not in n]
            meta["adapter"] = {"rank": self.lora.rank, "alpha": self.lora.alpha,
                               "targets": list(self.lora.targets), "base": str(self.init_from.resolve()),
                               "train_also": train_also}
        return meta

    def resume(self) -> None:
        from ..io.checkpoint import read_config

        saved = read_config(self.out)
        self.cfg = self.loop.cfg = check_plan(saved.get("train", {}), self.cfg, self.dist.world,
                                              saved.get("world_size", 1), self.log)
        was = (saved.get("adapter") or {}).get("rank")
        now = self.lora.rank if self.lora else None
        if was != now:
            raise BardlmError(f"--resume: LoRA rank was {was} in this run and is now {now}; keep the run's settings")
        step, self.history, _ = self.state.resume()
        self.loop.step = step
        self.log(f"resumed {self.out} at step {step}")

    def val_loss(self) -> float:
        """Mean loss over every target token of the held-out conversations (every rank
        evaluates all of them: FSDP needs all ranks in every forward)."""
        return evaluate(self.model, val_batches(self.val_rows, self.cfg.batch_size), self.device,
                        partial(autocast, self.cfg, self.device), count=count_targets)

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """This rank's micro-batch: (x, y, ...), x (B, L) the ids the model runs over."""
        d = self.dist
        batch = self.batches.batch(step, micro, self.cfg.batch_size, self.cfg.grad_accum, d.rank, d.world)
        self._tokens += batch[0].numel()
        return batch

    def fit(self) -> dict[str, Any]:
        """Train to max_iters, evaluating and saving every eval_interval steps (and at the end)."""
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        start = t0 = time.time()
        before = self.history[-1]["elapsed_s"] if self.history else 0.0
        loss = float("nan")
        bar = progress_bar(self.progress, cfg.max_iters, "finetune", initial=self.loop.step)
        try:
            with self.signals:
                while self.loop.step < cfg.max_iters:
                    self._tokens = 0
                    try:
                        loss = self.loop.train_step(self._batch)
                    except Diverged as e:
                        raise diverged(e, self.out) from None
                    now = time.time()
                    # The tokens the model ran over (padding included), as this rank's x ranks.
                    tok_s, t0 = self._tokens * self.dist.world / max(now - t0, 1e-9), now
                    step = self.loop.step
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", grad_norm=f"{self.loop.grad_norm:.3g}")
                    if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                        self._record(loss, tok_s, before + time.time() - start)
                        t0 = time.time()  # the next step's tokens/s leaves out evaluating and saving
                    alone_told = not self.dist.enabled and self.signals.signum is not None
                    if self.parallel.stop_agreed or alone_told:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.state.save(self.loop.step, self.history, self.meta())
            raise interrupted(self.loop.step, resume_command(self.command, self.out, *self.run_flags())) from None
        finally:
            if bar is not None:
                bar.close()
        return {"step": self.loop.step, **(self.history[-1] if self.history else {}),
                "trainable_params": self.trainable, "total_params": self.total}

    def _record(self, train_loss: float, tok_s: float, elapsed: float) -> None:
        row = {"step": self.loop.step, "train_loss": train_loss, **self.eval_metrics(),
               "lr": self.loop.optimizer.param_groups[0]["lr"], "grad_norm": self.loop.grad_norm,
               **speed(tok_s, self.flops_per_token, self.device), "elapsed_s": elapsed}
        self.history.append(row)
        # The line before the save, as in `Trainer._record` (resuming drops a line past the save).
        if self.dist.is_main:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self.state.save(self.loop.step, self.history, self.meta())
        self.after_record()
        if not self.progress:
            self.log(self.describe(row))


# Scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, template: ChatTemplate,
                convs: list[list[dict[str, str]]], max_new_tokens: int = 32,
                batch_size: int = 64) -> float:
    """Share of conversations whose last assistant message the model reproduces exactly
    (greedy decoding from everything before it, cut at the end of the turn)."""
    from ..infer.chat import prompt_ids
    from ..infer.generate import generate_batch

    hits = 0
    stop = template.stop_ids(tokenizer)
    for i in range(0, len(convs), batch_size):
        chunk = convs[i : i + batch_size]
        prompts = [prompt_ids(template, tokenizer, c[:-1]) for c in chunk]
        outs = generate_batch(model, prompts, max_new_tokens, temperature=0.0, eos_ids=stop)
        for conv, ids in zip(chunk, outs):
            text = tokenizer.decode(ids).split(template.end)[0] if ids else ""
            hits += text == conv[-1]["content"]
    return hits / len(convs)
