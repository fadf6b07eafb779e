"""Supervised finetuning on conversations: chat JSONL -> (ids, assistant-only targets) -> Loop.

Data: one conversation per line, {"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}. Each conversation is rendered with the model's chat template
(`infer.chat`) and tokenized whole; a token's target is the next token when an assistant wrote
that next token, else -1 (ignored by the loss). So the loss counts assistant tokens only: the
model learns to answer, not to predict its users.

Batches: conversations padded on the right to the longest in the batch (targets -1 on the
padding). Attention is causal, so a real token never sees the padding after it, and one row is
one conversation: nothing attends across examples. Validation: whole held-out conversations.

Training is `loop.Loop` (the one optimizer step), saved and resumed by `state.RunState`; with
LoRA (`nn.lora`) only the adapters train and only they are saved (`io.adapter`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import BardlmError
from ..infer.chat import ChatTemplate, check_messages, encode_chat, prepare_vocab, template_for
from ..infer.device import resolve_device
from ..io.adapter import load_base
from ..nn.lora import TARGETS, apply_lora, count_trainable
from ..nn.resize import resize_vocab
from ..tokenizers import HFTokenizer
from .distributed import Dist
from .loop import Diverged, Loop, evaluate
from .state import RunState, StopSignals, check_plan

METRICS_FILE = "metrics.jsonl"


# Data ---------------------------------------------------------------------------------------
def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a chat JSONL file; a bad line is a one-line error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise BardlmError(f"--data {path} does not exist; pass a .jsonl file of conversations")
    convs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BardlmError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict) or "messages" not in row:
                raise BardlmError(f'{where}: expected an object {{"messages": [...]}}')
            messages = check_messages(row["messages"], where)
            if not any(m["role"] == "assistant" for m in messages):
                raise BardlmError(f"{where}: no assistant message, so nothing to learn from")
            convs.append(messages)
    if not convs:
        raise BardlmError(f"{path} holds no conversations")
    return convs


def encode_examples(convs: list[list[dict[str, str]]], template: ChatTemplate, tokenizer: Any,
                    block_size: int) -> tuple[list[torch.Tensor], int]:
    """Each conversation as one row (2, L): its ids and its targets (next id, or -1 where the
    next id is not the assistant's). L <= block_size + 1: longer conversations are cut (their
    count is returned); one with no assistant token left is dropped."""
    rows, cut = [], 0
    for messages in convs:
        ids, mine = encode_chat(template, tokenizer, messages)
        if len(ids) > block_size + 1:
            ids, mine, cut = ids[: block_size + 1], mine[: block_size + 1], cut + 1
        targets = [t if m else -1 for t, m in zip(ids[1:], mine[1:])] + [-1]
        if any(t >= 0 for t in targets):
            rows.append(torch.tensor([ids, targets], dtype=torch.long))
    return rows, cut


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
    """Batches of conversations in a fresh random order every epoch, a pure function of
    (seed, step, micro): resuming needs only the step."""

    def __init__(self, rows: list[torch.Tensor], seed: int) -> None:
        if not rows:
            raise BardlmError("no training conversation has an assistant token within the context")
        self.rows, self.seed = rows, seed

    def batch(self, step: int, micro: int, batch_size: int, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (step * n_micro + micro) * batch_size
        picked = []
        for s in range(first, first + batch_size):
            epoch, i = divmod(s, len(self.rows))
            perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            picked.append(self.rows[int(perm[i])])
        return pad_rows(picked)


def val_batches(rows: list[torch.Tensor], batch_size: int):  # noqa: ANN201
    for i in range(0, len(rows), batch_size):
        yield pad_rows(rows[i : i + batch_size])


# The run ------------------------------------------------------------------------------------
@dataclass
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS


class Finetuner:
    """A finetuning run: base model + chat data -> `out` (a checkpoint, or a LoRA adapter)."""

    def __init__(self, init_from: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig,
                 lora: LoRASpec | None = None, log: Callable[[str], None] = print,
                 resume: bool = False) -> None:
        self.init_from, self.data, self.out, self.cfg, self.lora = Path(init_from), Path(data), Path(out), cfg, lora
        self.log, self.history = log, []
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        model, tokenizer = load_base(self.init_from)
        self.template = template_for(self.init_from, tokenizer)
        tokenizer, added = prepare_vocab(self.template, tokenizer)
        if added:
            log(f"the chat template adds {added} token(s) to the vocabulary")
        self.tokenizer = tokenizer
        self.model = resize_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size))
        convs = read_chat_jsonl(self.data)
        train, val = split_conversations(convs, cfg.val_fraction, cfg.seed)
        T = self.model.config.block_size
        train_rows, cut = encode_examples(train, self.template, tokenizer, T)
        self.val_rows, cut_val = encode_examples(val, self.template, tokenizer, T)
        if cut + cut_val:
            log(f"note: {cut + cut_val} conversation(s) longer than the context ({T}) were cut")
        if not self.val_rows:
            raise BardlmError("no held-out conversation has an assistant token within the context")
        self.batches = ChatBatches(train_rows, cfg.seed)
        self.n_train, self.n_val = len(train_rows), len(self.val_rows)
        if lora is not None:
            grew = ("transformer.wte.weight",) + (() if self.model.config.tie_embeddings else ("lm_head.weight",))
            apply_lora(self.model, lora.rank, lora.alpha, lora.targets, grew if added else ())
        self.model.to(self.device).train()
        self.trainable, self.total = count_trainable(self.model)
        self.loop = Loop(self.model, cfg, device=self.device)
        self.state = RunState(self.out, self.model, self.loop.optimizer, tokenizer, Dist(), self.device,
                              False, log, trainable_only=lora is not None)
        self.signals = StopSignals()
        if resume:
            self.resume()

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "init_from": str(self.init_from.resolve()), "data": str(self.data),
            "train": dataclasses.asdict(self.cfg), "tokenizer": self.tokenizer.kind,
            "chat_template": self.template.to_dict(), "world_size": 1,
        }
        if isinstance(self.tokenizer, HFTokenizer):  # what generation stops at, as converted HF runs
            meta["special_tokens"] = {"bos_id": self.tokenizer.bos_id, "add_bos": self.tokenizer.add_bos,
                                      "eos_ids": list(self.tokenizer.eos_ids)}
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
        self.cfg = self.loop.cfg = check_plan(saved.get("train", {}), self.cfg, 1, 1, self.log)
        was = (saved.get("adapter") or {}).get("rank")
        now = self.lora.rank if self.lora else None
        if was != now:
            raise BardlmError(f"--resume: LoRA rank was {was} in this run and is now {now}; keep the run's settings")
        step, self.history, _ = self.state.resume()
        self.loop.step = step
        self.log(f"resumed {self.out} at step {step}")

    def val_loss(self) -> float:
        return evaluate(self.model, val_batches(self.val_rows, self.cfg.batch_size), self.device)

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.batch(step, micro, self.cfg.batch_size, self.cfg.grad_accum)

    def fit(self) -> dict[str, Any]:
        """Train to max_iters, evaluating and saving every eval_interval steps (and at the end)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        before = self.history[-1]["elapsed_s"] if self.history else 0.0
        loss = float("nan")
        try:
            with self.signals:
                while self.loop.step < cfg.max_iters:
                    try:
                        loss = self.loop.train_step(self._batch)
                    except Diverged as e:
                        raise BardlmError(f"{e}; the last good checkpoint in {self.out} is kept") from None
                    step = self.loop.step
                    if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                        self._record(loss, before + time.time() - start)
                    if self.signals.signum is not None:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.state.save(self.loop.step, self.history, self.meta())
            raise BardlmError(f"interrupted at step {self.loop.step}; checkpoint saved, continue "
                              f"with --resume (--out {self.out})") from None
        return {"step": self.loop.step, **(self.history[-1] if self.history else {}),
                "trainable_params": self.trainable, "total_params": self.total}

    def _record(self, train_loss: float, elapsed: float) -> None:
        row = {"step": self.loop.step, "train_loss": train_loss, "val_loss": self.val_loss(),
               "lr": self.loop.optimizer.param_groups[0]["lr"], "elapsed_s": elapsed}
        self.history.append(row)
        self.state.save(self.loop.step, self.history, self.meta())  # before metrics mention it
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.log(f"step {row['step']}: train {train_loss:.4f} val {row['val_loss']:.4f}")


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
