"""Preference tuning: Direct Preference Optimization (Rafailov et al., 2023) and its variants.

Data: one preference pair a line, TRL's formats. Conversational:
    {"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}
rendered with the model's chat template (as `finetune`); or plain text, no template:
    {"prompt": "...", "chosen": "...", "rejected": "..."}
Only the completion's tokens count (the chosen or rejected answer, and its end-of-turn marker).

The objective. With log pi(y|x) summed over the completion's tokens, and the reference model's
log pi_ref(y|x) computed once before training (the starting weights; with LoRA they are also
the base with adapters off, as the adapters start at zero: no second copy in memory):

    reward r(y) = beta * (log pi(y|x) - log pi_ref(y|x))
    sigmoid:  -log sigmoid(r(chosen) - r(rejected))                    (DPO)
    ipo:      (d - 1 / (2 beta))^2,  d = Δ(chosen)/|chosen| - Δ(rejected)/|rejected|   (IPO)
    norm:     -log sigmoid(beta * d)            (length-normalised, SimPO-style, with a reference)

where Δ = log pi - log pi_ref and |y| counts y's tokens. DPO can lower the likelihood of the
chosen answers too (only their margin over the rejected ones is pulled up); `sft_weight` > 0 adds
that weight times the chosen tokens' mean negative log-likelihood (TRL's "sft" loss term, as in
RPO, Pang et al., 2024), which keeps the right answers likely. Logged on held-out pairs: the loss, the
mean rewards of chosen and rejected, their margin, and the preference accuracy (the share of
pairs where r(chosen) > r(rejected)). Training is `sft.Finetuner`'s: the same `Loop`, saves
and resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BardlmError
from ..infer.chat import _encode, check_messages, encode_chat
from ..infer.generate import eval_mode
from .logps import sequence_logps
from .sft import ChatBatches, Finetuner, jsonl_rows, pad_rows, split_conversations, target_row

LOSSES = ("sigmoid", "ipo", "norm")


# Data ---------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A prompt (messages, or text) with a preferred and a dispreferred completion."""

    prompt: list[dict[str, str]] | str
    chosen: list[dict[str, str]] | str
    rejected: list[dict[str, str]] | str

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def _completion(value: Any, key: str, where: str, text: bool) -> Any:
    """A checked completion: a non-empty string (plain text) or messages with an answer."""
    if text:
        if not isinstance(value, str):
            raise BardlmError(f'{where}: "{key}" must be a string like "prompt" (plain text), or make all three message lists')
        if not value.strip():
            raise BardlmError(f'{where}: "{key}" is empty; each completion needs some text')
        return value
    messages = check_messages(value, f'{where}: "{key}"')
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BardlmError(f'{where}: "{key}" has no non-empty assistant message; each completion needs an answer')
    return messages


def read_pref_jsonl(path: str | Path) -> list[Pair]:
    """The preference pairs of a JSONL file; a bad line is a one-line error naming file:line."""
    pairs = []
    for where, row in jsonl_rows(path, "preference pairs"):
        if not isinstance(row, dict):
            raise BardlmError(f'{where}: expected an object {{"prompt", "chosen", "rejected"}}')
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise BardlmError(f'{where}: missing "{key}"; each line needs "prompt", "chosen" and "rejected"')
        text = isinstance(row["prompt"], str)
        prompt = row["prompt"] if text else check_messages(row["prompt"], f'{where}: "prompt"')
        pairs.append(Pair(prompt, _completion(row["chosen"], "chosen", where, text),
                          _completion(row["rejected"], "rejected", where, text)))
    if not pairs:
        raise BardlmError(f"{path} holds no preference pairs")
    return pairs


def encode_completion(prompt: list[dict[str, str]] | str, completion: list[dict[str, str]] | str,
                      template: Any, tokenizer: Any, block_size: int) -> tuple[torch.Tensor | None, bool]:
    """(row (2, L) of ids and targets, was it cut?): targets are the completion's tokens only."""
    if isinstance(prompt, str):
        p, c = _encode(tokenizer, prompt), _encode(tokenizer, completion)
        ids, mine = p + c, [False] * len(p) + [True] * len(c)
    else:
        earlier = sum(m["role"] == "assistant" for m in prompt)
        ids, mine = encode_chat(template, tokenizer, prompt + completion, skip_turns=earlier)
    return target_row(ids, mine, block_size)


def encode_pairs(pairs: list[Pair], template: Any, tokenizer: Any,
                 block_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Each pair as (chosen row, rejected row); a pair whose completion does not fit in the
    context at all is dropped. Returns the rows and how many pairs were cut or dropped."""
    rows, cut = [], 0
    for pair in pairs:
        (c, cut_c), (r, cut_r) = (encode_completion(pair.prompt, y, template, tokenizer, block_size)
                                  for y in (pair.chosen, pair.rejected))
        cut += cut_c or cut_r
        if c is not None and r is not None:
            rows.append((c, r))
    return rows, cut


def pair_batch(rows: list[tuple[torch.Tensor, torch.Tensor]], ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pairs -> x (2B, L), y (2B, L) (the B chosen rows, then the B rejected), ref (2B,)."""
    x, y = pad_rows([c for c, _ in rows] + [r for _, r in rows])
    return x, y, torch.cat([ref[:, 0], ref[:, 1]])


# The objective ------------------------------------------------------------------------------
def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float, kind: str = "sigmoid", n_c: torch.Tensor | None = None,
             n_r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and rewards of chosen and rejected (B,) each, from summed
    log-probabilities (B,) of policy and reference; n_c, n_r (B,): completion lengths (ipo, norm)."""
    d_c, d_r = logp_c - ref_c, logp_r - ref_r
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (d_c - d_r))
    elif kind in ("ipo", "norm"):
        if n_c is None or n_r is None:
            raise BardlmError(f"the {kind} loss needs the completions' lengths")
        d = d_c / n_c.clamp(min=1) - d_r / n_r.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * d)
    else:
        raise BardlmError(f"unknown DPO loss {kind!r}; use one of {', '.join(LOSSES)}")
    return losses, beta * d_c, beta * d_r


def sft_term(logp_c: torch.Tensor, n_c: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen token over the batch: TRL's "sft" loss term."""
    return -logp_c.sum() / n_c.sum().clamp(min=1)


# The run ------------------------------------------------------------------------------------
class DPOTuner(Finetuner):
    """A DPO run: base model + preference pairs -> `out` (a checkpoint, or a LoRA adapter)."""

    token_weighted = False  # the loss is a mean over pairs already

    def __init__(self, *args: Any, beta: float = 0.1, loss: str = "sigmoid", sft_weight: float = 0.0,
                 **kwargs: Any) -> None:
        if loss not in LOSSES:
            raise BardlmError(f"unknown --loss {loss!r}; use one of {', '.join(LOSSES)}")
        if not beta > 0:
            raise BardlmError(f"--beta must be positive, got {beta}")
        if sft_weight < 0:
            raise BardlmError(f"--sft-weight must be >= 0, got {sft_weight}")
        self.beta, self.loss_kind, self.sft_weight = beta, loss, sft_weight
        super().__init__(*args, **kwargs)

    def load_data(self) -> None:
        pairs = read_pref_jsonl(self.data)
        train, val = split_conversations(pairs, self.cfg.val_fraction, self.cfg.seed)
        T = self.model.config.block_size
        self.train_pairs, cut = encode_pairs(train, self.template, self.tokenizer, T)
        self.val_pairs, cut_val = encode_pairs(val, self.template, self.tokenizer, T)
        if cut + cut_val:
            self.log(f"note: {cut + cut_val} pair(s) longer than the context ({T}) were cut")
        if not self.train_pairs or not self.val_pairs:
            raise BardlmError("no training or no held-out pair has a completion within the context")
        self.n_train, self.n_val = len(self.train_pairs), len(self.val_pairs)
        self.batches = ChatBatches(list(range(self.n_train)), self.cfg.seed, self._collate)

    def _collate(self, picked: list[int]) -> tuple[torch.Tensor, ...]:
        return pair_batch([self.train_pairs[i] for i in picked], self.ref_train[picked])

    @torch.no_grad()
    def _logps(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities (N, 2) of chosen and rejected under the model as it is now
        (eval mode), and the completions' lengths (N, 2)."""
        out, lens = [], []
        with eval_mode(self.model):
            for i in range(0, len(pairs), self.cfg.batch_size):
                chunk = pairs[i : i + self.cfg.batch_size]
                x, y, _ = pair_batch(chunk, torch.zeros(len(chunk), 2))
                logp, n = sequence_logps(self.model, x.to(self.device), y.to(self.device))
                out.append(torch.stack(logp.cpu().chunk(2), dim=1))
                lens.append(torch.stack(n.cpu().chunk(2), dim=1))
        return torch.cat(out), torch.cat(lens)

    def prepare(self) -> None:
        """The reference: the starting model's log-probabilities of every pair, computed once."""
        self.ref_train, _ = self._logps(self.train_pairs)
        self.ref_val, self.val_lens = self._logps(self.val_pairs)

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> tuple[None, torch.Tensor]:
        logp, n = sequence_logps(self.parallel.forward, x, y)
        (lc, lr), (rc, rr), (nc, nr) = logp.chunk(2), ref.chunk(2), n.chunk(2)
        losses, _, _ = dpo_loss(lc, lr, rc, rr, self.beta, self.loss_kind, nc, nr)
        return None, losses.mean() + self.sft_weight * sft_term(lc, nc)

    def eval_metrics(self) -> dict[str, float]:
        logp, lens = self._logps(self.val_pairs)
        ref = self.ref_val
        losses, r_c, r_r = dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], self.beta,
                                    self.loss_kind, lens[:, 0], lens[:, 1])
        loss = losses.mean() + self.sft_weight * sft_term(logp[:, 0], lens[:, 0])
        return {"val_loss": loss.item(), "reward_chosen": r_c.mean().item(),
                "reward_rejected": r_r.mean().item(), "margin": (r_c - r_r).mean().item(),
                "pref_accuracy": (r_c > r_r).float().mean().item()}

    def preference_accuracy(self) -> float:
        """Held-out preference accuracy of the model as it is now."""
        return self.eval_metrics()["pref_accuracy"]

    def describe(self, row: dict[str, Any]) -> str:
        return (f"step {row['step']}: train {row['train_loss']:.4f} val {row['val_loss']:.4f} "
                f"rewards {row['reward_chosen']:+.3f}/{row['reward_rejected']:+.3f} "
                f"margin {row['margin']:+.3f} accuracy {row['pref_accuracy']:.2f}")

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "dpo": self._settings()}

    command = "dpo"

    def run_flags(self) -> list[str]:
        return [*super().run_flags(), "--beta", f"{self.beta:g}", "--loss", self.loss_kind,
                "--sft-weight", f"{self.sft_weight:g}"]

    def _settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "loss": self.loss_kind, "sft_weight": self.sft_weight}

    def resume(self) -> None:
        from ..io.checkpoint import read_config

        was = read_config(self.out).get("dpo", {})
        now = self._settings()
        for key in now:
            if key in was and was[key] != now[key]:
                raise BardlmError(f"--resume: {key} was {was[key]!r} in this run and is now {now[key]!r}; "
                                  "keep the run's settings")
        super().resume()
