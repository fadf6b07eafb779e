"""Synthetic sequence-to-sequence tasks (reverse, sort, copy) and a small training loop for the
encoder-decoder Transformer, scored by exact-sequence accuracy on held-out pairs.

A pair: source x = (x_1 .. x_n) over `vocab` symbols, n in [min_length, length]; target
reverse(x), sorted(x) or x. Ids 0, 1, 2 are PAD, BOS, EOS; symbol s is id 3 + s.

    src     (B, L)       x_1 .. x_n PAD ..
    dec_in  (B, L + 1)   BOS y_1 .. y_n PAD ..      (teacher forcing)
    targets (B, L + 1)   y_1 .. y_n EOS PAD ..      (PAD is not scored)

The held-out sources are drawn first; training batches never contain them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig, check_types
from ..errors import BardlmError
from ..infer.device import resolve_device
from ..train.loop import Loop
from .model import (
    BOS,
    EOS,
    PAD,
    EncoderDecoder,
    Seq2SeqConfig,
    beam_search,
    save_seq2seq,
)

TASKS = ("reverse", "sort", "copy")
N_SPECIAL = 3  # PAD, BOS, EOS come before the symbols
METRICS_FILE = "metrics.jsonl"


@dataclass
class TaskConfig:
    """What to learn and how long to train."""

    task: str = "reverse"
    length: int = 16  # longest source sequence
    min_length: int | None = None  # None -> every source has `length` symbols
    vocab: int = 10  # number of distinct symbols
    n_test: int = 1000  # held-out pairs for the exact-sequence accuracy
    batch_size: int = 64
    max_iters: int = 800
    lr: float = 2e-3  # peak learning rate, reached at the end of the warm-up
    min_lr: float = 1e-5
    warmup_iters: int = 100  # linear warm-up: post-norm stacks diverge without it
    schedule: str = "cosine"  # "cosine" decay to min_lr, or "noam" (the paper's 1/sqrt(step))
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_pairs: int = 250  # held-out pairs decoded at each evaluation (all of them at the end)
    beam: int = 4  # beam width of the final evaluation (greedy is always reported too)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_types(self, "seq2seq")
        if self.task not in TASKS:
            raise BardlmError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("length", "vocab", "n_test", "batch_size", "max_iters", "eval_interval",
                     "eval_pairs", "beam"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise BardlmError(f"seq2seq: --{name.replace('_', '-')} must be a positive integer, "
                                  f"got {getattr(self, name)!r}")
        if not 1 <= self.lo <= self.length:
            raise BardlmError(f"seq2seq: --min-length must be in [1, {self.length}], got {self.min_length}")
        if self.schedule not in ("cosine", "noam"):
            raise BardlmError(f"seq2seq: schedule must be cosine or noam, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_iters < 0:
            raise BardlmError(f"seq2seq: lr must be positive and warmup_iters >= 0, got {self.lr}, {self.warmup_iters}")
        space = sum(self.vocab**n for n in range(self.lo, self.length + 1))
        if self.n_test > space // 2:
            raise BardlmError(
                f"seq2seq: only {space} distinct sources exist for length {self.length} over "
                f"{self.vocab} symbols, too few to hold out {self.n_test}; raise --length or "
                f"--vocab, or lower n_test below {space // 2 + 1}"
            )

    @property
    def lo(self) -> int:
        return self.length if self.min_length is None else self.min_length

    def model_config(self, **overrides: Any) -> Seq2SeqConfig:
        """A model sized for the task: both vocabularies are PAD, BOS, EOS + the symbols."""
        V = N_SPECIAL + self.vocab
        fields = dict(src_vocab_size=V, tgt_vocab_size=V, max_len=self.length + 1)
        return Seq2SeqConfig(**{**fields, **overrides})


def task_config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TaskConfig)]


# Data -------------------------------------------------------------------------------------
def target_of(task: str, src: np.ndarray) -> np.ndarray:
    """The target of each source row (N, L), PAD-padded on the right -> (N, L), padded alike."""
    n = (src != PAD).sum(1)  # real lengths
    cols = np.arange(src.shape[1])
    if task == "copy":
        return src.copy()
    if task == "reverse":
        idx = np.where(cols < n[:, None], n[:, None] - 1 - cols, cols)  # mirror the real part
        return np.take_along_axis(src, idx, axis=1)
    big = np.iinfo(src.dtype).max  # sort: padding sorts last, then is restored to PAD
    return np.where(cols < n[:, None], np.sort(np.where(src == PAD, big, src), axis=1), PAD)


def sample_sources(rng: np.random.Generator, n: int, cfg: TaskConfig) -> np.ndarray:
    """n random sources (n, length): symbols 3.., PAD after each row's random length."""
    sym = rng.integers(0, cfg.vocab, size=(n, cfg.length)) + N_SPECIAL
    lengths = rng.integers(cfg.lo, cfg.length + 1, size=n)
    return np.where(np.arange(cfg.length) < lengths[:, None], sym, PAD).astype(np.int64)


def make_batch(task: str, src: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources (B, L) -> (src (B, L), dec_in (B, L + 1), targets (B, L + 1)) tensors."""
    tgt = target_of(task, src)
    n = (src != PAD).sum(1)
    B, L = src.shape
    targets = np.concatenate([tgt, np.full((B, 1), PAD)], axis=1)
    targets[np.arange(B), n] = EOS
    dec_in = np.concatenate([np.full((B, 1), BOS), tgt], axis=1)
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in (src, dec_in, targets))


class PairSampler:
    """Held-out test sources, drawn once, and training batches that never include them."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        test: dict[bytes, np.ndarray] = {}
        while len(test) < cfg.n_test:
            for row in sample_sources(self.rng, cfg.n_test, cfg):
                if len(test) < cfg.n_test:
                    test.setdefault(row.tobytes(), row)
        self.held_out = set(test)
        self.test = np.stack(list(test.values()))

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = sample_sources(self.rng, self.cfg.batch_size, self.cfg)
        for i, row in enumerate(src):
            while row.tobytes() in self.held_out:  # redraw: a test source is never trained on
                row = src[i] = sample_sources(self.rng, 1, self.cfg)[0]
        return make_batch(self.cfg.task, src)


# Training ---------------------------------------------------------------------------------
def train_config(cfg: TaskConfig) -> TrainConfig:
    """The library's training settings for a task: the paper's Adam betas (0.9, 0.98) and eps
    1e-9, linear warm-up, cosine (or noam) decay; trained by the library's one loop."""
    return TrainConfig(
        batch_size=cfg.batch_size, max_iters=cfg.max_iters, lr=cfg.lr, min_lr=cfg.min_lr,
        warmup_iters=cfg.warmup_iters, schedule=cfg.schedule, weight_decay=cfg.weight_decay,
        beta1=0.9, beta2=0.98, eps=1e-9, grad_clip=cfg.grad_clip, seed=cfg.seed,
        device=cfg.device, optimizer="foreach",
    )


@torch.no_grad()
def evaluate(model: EncoderDecoder, cfg: TaskConfig, sources: np.ndarray, beam: int = 1,
             batch: int = 500) -> dict[str, float]:
    """Exact-sequence and per-token accuracy of decoding (greedy, or beam) on sources (N, L)."""
    exact, tok_right, tok_total = 0, 0, 0
    device = next(model.parameters()).device
    for i in range(0, len(sources), batch):
        src, _, targets = (t.to(device) for t in make_batch(cfg.task, sources[i : i + batch]))
        pred = beam_search(model, src, max_len=targets.shape[1], beam=beam)
        scored = targets != PAD  # the symbols and the EOS
        right = (pred == targets) | ~scored
        exact += int(right.all(1).sum())
        tok_right += int(((pred == targets) & scored).sum())
        tok_total += int(scored.sum())
    return {"seq_acc": exact / len(sources), "token_acc": tok_right / tok_total}


def train_seq2seq(
    cfg: TaskConfig,
    model_cfg: Seq2SeqConfig,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[EncoderDecoder, dict[str, Any]]:
    """Train on fresh random pairs, evaluate on the held-out ones; write metrics.jsonl and the
    model into `out` (if given). Returns the model and the final metrics."""
    torch.manual_seed(cfg.seed)
    data = PairSampler(cfg)
    device = resolve_device(cfg.device)
    model = EncoderDecoder(model_cfg).to(device)
    loop = Loop(model, train_config(cfg), device=device)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
    eval_src = data.test[: cfg.eval_pairs]
    start, cpu_start = time.time(), time.process_time()
    model.train()
    while loop.step < cfg.max_iters:
        loss = loop.train_step(lambda step, micro: data.train_batch())
        step = loop.step
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            acc = evaluate(model, cfg, eval_src)
            model.train()
            row = {"step": step, "train_loss": loss, "lr": loop.optimizer.param_groups[0]["lr"],
                   "held_out_seq_acc": acc["seq_acc"], "held_out_token_acc": acc["token_acc"],
                   "eval_pairs": len(eval_src), "elapsed_s": time.time() - start}
            _append(out, row)
            log(f"step {step}: loss {loss:.4f}, exact-sequence accuracy "
                f"{acc['seq_acc']:.3f} on {len(eval_src)} held-out pairs")
    train_s, train_cpu_s = time.time() - start, time.process_time() - cpu_start
    greedy = evaluate(model, cfg, data.test)
    final: dict[str, Any] = {
        "final": True, "task": cfg.task, "length": cfg.length, "vocab": cfg.vocab,
        "step": cfg.max_iters, "seq_acc": greedy["seq_acc"], "token_acc": greedy["token_acc"],
        "n_test": len(data.test), "train_s": train_s,
        # CPU seconds of this process: close to the wall time on an idle machine, whatever the load.
        "train_cpu_s": train_cpu_s, "params": model.num_params(),
    }
    if cfg.beam > 1:
        final[f"seq_acc_beam{cfg.beam}"] = evaluate(model, cfg, data.test, beam=cfg.beam)["seq_acc"]
    final["elapsed_s"] = time.time() - start
    _append(out, final)
    if out is not None:
        save_seq2seq(out, model, {"task": dataclasses.asdict(cfg)})
    log(f"{cfg.task}: exact-sequence accuracy {final['seq_acc']:.4f} (greedy) on "
        f"{len(data.test)} held-out pairs after {cfg.max_iters} steps, {train_s:.0f} s of training")
    return model, final


def _append(out: Path | None, row: dict[str, Any]) -> None:
    if out is not None:
        with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
