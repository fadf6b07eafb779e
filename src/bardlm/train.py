"""Training: AdamW, warm-up + cosine schedule, clipping, accumulation, evaluation, checkpoints,
exact resume.

One training step:  (x, y) (B, T) --model--> logits (B, T, V) --cross-entropy--> loss
--backward--> grads (accumulated over `grad_accum` micro-batches) --clip--> AdamW step.
Every `eval_interval` steps: validation loss and bits per character -> metrics.jsonl, loss.png
and a checkpoint that `--resume` continues from exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    CONFIG_FILE,
    atomic_write_many,
    checkpoint_writes,
    load_state,
    load_tensors,
    read_config,
    tensors_writer,
    text_writer,
)
from .config import ModelConfig
from .data import Batches, Split, split_ids, val_windows
from .errors import BardlmError
from .model import GPT
from .tokenizers import Tokenizer

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything about a run that is not the model's shape."""

    batch_size: int = 12
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None -> max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    eval_interval: int = 250
    eval_batches: int = 20  # validation subset during training: eval_batches * batch_size windows
    seed: int = 1337
    val_fraction: float = 0.1
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_iters", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise BardlmError(f"train: {name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise BardlmError(f"train: lr must be positive and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if self.dtype not in ("fp32", "bf16"):
            raise BardlmError(f"train: dtype must be fp32 or bf16, got {self.dtype!r} (fp16 is unusable on CPU)")
        if not 0 < self.val_fraction < 1:
            raise BardlmError(f"train: val_fraction must be in (0, 1), got {self.val_fraction}")


# Training budgets of the presets (model shapes are in config.PRESETS under the same names).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU recipe: batch 12, 2000 iterations, lr 1e-3 decaying to 1e-4.
    "char-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "llama-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "qwen3-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "word-small": dict(batch_size=32, max_iters=3000, lr=1e-3, min_lr=1e-4, warmup_iters=200),
}


def train_config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `lr_decay_iters`."""
    decay = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases, norms and gains stay undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def bits_per_char(loss: float, n_tokens: int, n_chars: int) -> float:
    """Nats per token -> bits per character, comparable across tokenizers."""
    return loss * n_tokens / max(n_chars, 1) / math.log(2)


class Trainer:
    """Owns a run: model, optimizer, data, and the output directory."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        tokenizer: Tokenizer,
        text: str,
        out: str | Path,
        progress: bool = True,
        log: Callable[[str], None] = print,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.tokenizer, self.out = train_cfg, tokenizer, Path(out)
        self.progress, self.log, self.meta = progress, log, dict(meta or {})
        if model_cfg.vocab_size != tokenizer.vocab_size:
            model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
        self.model_cfg = model_cfg
        ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        self.train_split, self.val_split = split_ids(ids, len(text), train_cfg.val_fraction)
        T = model_cfg.block_size
        self.batches = Batches(self.train_split.ids, T, train_cfg.seed)
        self.val = val_windows(self.val_split.ids, T)
        # A fixed, evenly spread validation subset for the evaluations during training.
        n_sub = min(len(self.val), train_cfg.eval_batches * train_cfg.batch_size)
        self.val_subset = self.val[torch.linspace(0, len(self.val) - 1, n_sub).long()]
        torch.manual_seed(train_cfg.seed)
        self.device = torch.device(train_cfg.device)
        self.model = GPT(model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None

    # Evaluation -----------------------------------------------------------------------------
    def _autocast(self):  # noqa: ANN202
        if self.cfg.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor, batch_size: int | None = None) -> float:
        """Mean next-token loss (nats) over validation windows (N, T + 1)."""
        self.model.eval()
        bs = batch_size or self.cfg.batch_size * 4
        total, count = 0.0, 0
        for i in range(0, len(windows), bs):
            w = windows[i : i + bs].to(self.device)
            with self._autocast():
                _, loss = self.model(w[:, :-1], w[:, 1:])
            total += loss.item() * w.shape[0]
            count += w.shape[0]
        self.model.train()
        return total / count

    def bpc(self, loss: float, split: Split) -> float:
        return bits_per_char(loss, len(split.ids), split.n_chars)

    # One step -------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.batches.batch(self.step, cfg.batch_size, micro=micro, n_micro=cfg.grad_accum)
            with self._autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise BardlmError(
                f"loss became {total} at step {self.step}; the last good checkpoint in "
                f"{self.out} is kept. Lower the learning rate (--set lr=...) or use fp32"
            )
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    # Checkpoints ----------------------------------------------------------------------------
    def run_meta(self) -> dict[str, Any]:
        return {
            **self.meta,
            "train": dataclasses.asdict(self.cfg),
            "step": self.step,
            "tokenizer": self.tokenizer.kind,
        }

    def save(self) -> None:
        """Weights, config, tokenizer, optimizer and trainer state: all replaced or none."""
        opt = self.optimizer.state_dict()
        tensors = {
            f"state.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()
        }
        tensors["rng.torch"] = torch.get_rng_state()
        state = {"step": self.step, "param_groups": opt["param_groups"], "history": self.history}
        writes = checkpoint_writes(self.out, self.model, self.tokenizer, self.run_meta())
        writes += [
            (self.out / OPTIMIZER_FILE, tensors_writer(tensors, {"step": str(self.step)})),
            (self.out / STATE_FILE, text_writer(json.dumps(state))),
        ]
        atomic_write_many(writes)

    def resume(self) -> None:
        """Restore weights, optimizer, RNG and step from `self.out` (written by `save`)."""
        meta = read_config(self.out)
        state_path = self.out / STATE_FILE
        if not state_path.is_file():
            raise BardlmError(f"{self.out} has no {STATE_FILE}; it cannot be resumed (train anew with --overwrite)")
        state = json.loads(state_path.read_text())
        if ModelConfig.from_dict(meta["model"]) != self.model_cfg:
            raise BardlmError(
                f"{self.out} holds a model of another shape; resume with the same --preset and --set"
            )
        load_state(self.model, load_tensors(self.out / "model.safetensors"), str(self.out))
        tensors = load_tensors(self.out / OPTIMIZER_FILE)
        torch.set_rng_state(tensors.pop("rng.torch"))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.step, self.history = state["step"], state["history"]
        self.log(f"resumed {self.out} at step {self.step}")

    # The loop -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop_signal = signum  # handled at the next step boundary, never mid-save

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to max_iters (or stop early at step `until`, saving a checkpoint there).

        Returns the final metrics, with the loss over the whole validation split.
        """
        cfg = self.cfg
        stop = min(until, cfg.max_iters) if until is not None else cfg.max_iters
        self.out.mkdir(parents=True, exist_ok=True)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_cfg.block_size
        bar = _progress(self.progress, cfg.max_iters, self.step)
        start, t0, last_loss = time.time(), time.time(), float("nan")
        elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        try:
            self.model.train()
            while self.step < stop:
                last_loss = self.train_step()
                now = time.time()
                tok_s = tokens_per_step / max(now - t0, 1e-9)
                t0 = now
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}")
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                    self._record(last_loss, tok_s, elapsed_before + time.time() - start)
                if self._stop_signal is not None:
                    self.save()
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            self.save()
            raise BardlmError(
                f"interrupted at step {self.step}; checkpoint saved, continue with --resume {self.out}"
            ) from None
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        if bar is not None:
            bar.close()
        if stop < cfg.max_iters:
            self.save()
            return {"step": self.step}
        full = self.evaluate(self.val)
        final = {
            "step": self.step,
            "val_loss_full": full,
            "val_bpc_full": self.bpc(full, self.val_split),
            "val_windows": len(self.val),
            "elapsed_s": elapsed_before + time.time() - start,
        }
        self._append_metrics({"final": True, **final})
        self.log(
            f"step {self.step}: validation loss over the whole split {full:.4f} "
            f"({final['val_bpc_full']:.3f} bits/char, {len(self.val)} windows)"
        )
        return final

    def _record(self, train_loss: float, tok_s: float, elapsed: float) -> None:
        val = self.evaluate(self.val_subset)
        row = {
            "step": self.step,
            "train_loss": train_loss,
            "val_loss": val,
            "val_bpc": self.bpc(val, self.val_split),
            "lr": lr_at(self.step - 1, self.cfg),
            "tokens_per_sec": tok_s,
            "elapsed_s": elapsed,
        }
        self.history.append(row)
        self.save()  # first, so metrics.jsonl never mentions a step that has no checkpoint
        self._append_metrics(row)
        plot_losses(self.history, self.out / "loss.png")
        if not self.progress:
            self.log(f"step {self.step}: train {train_loss:.4f} val {val:.4f}")

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _progress(enabled: bool, total: int, initial: int):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["train_loss"] for r in history], label="train")
    ax.plot(steps, [r["val_loss"] for r in history], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into an existing run unless told to resume or overwrite it."""
    if out.exists() and not out.is_dir():
        raise BardlmError(f"--out {out} is a file; pass a directory")
    exists = out.is_dir() and (out / CONFIG_FILE).exists()
    if resume and not exists:
        raise BardlmError(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a run")
    if exists and not (resume or overwrite):
        raise BardlmError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if overwrite and exists:
        for name in (METRICS_FILE, STATE_FILE, OPTIMIZER_FILE, "loss.png"):
            (out / name).unlink(missing_ok=True)
