"""Language-model training: a run directory, its data, evaluations, metrics and checkpoints.

One training step:  (x, y) (B, T) --model--> logits (B, T, V) --cross-entropy--> loss
--backward--> grads (accumulated over `grad_accum` micro-batches) --clip--> optimizer step: that
step is `loop.Loop`, shared with every other trainer in bardlm. Every `eval_interval` steps:
validation loss and bits per character -> metrics.jsonl, loss.png and a checkpoint
(`state.RunState`) that `--resume` continues from exactly.

Fast paths, each a switch: `attn_impl` (model config; SDPA by default), `compile`
(torch.compile), `dtype="bf16"` (autocast), `optimizer` ("fused", "foreach" or "loop" AdamW, or
"muon"). Several processes: run under `torchrun` (see `distributed.py`); `fsdp=True` shards the
model with FSDP2's `fully_shard` instead of replicating it with DDP.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, TrainConfig
from ..errors import BardlmError
from ..infer.device import resolve_device
from ..io.checkpoint import CONFIG_FILE, METRICS_FILE, STATE_FILE, claim_out
from ..nn.model import GPT
from ..progress import progress_bar, show_progress
from ..tokenizers import Tokenizer
from .data import Batches, Prepared, Split, split_ids, val_windows
from .distributed import Dist, Parallel
from .loop import Diverged, Loop, autocast, evaluate, window_batches
from .memory import configure as configure_memory
from .speed import describe, flops_per_token, speed
from .state import (
    FREE_WITH_INIT,
    RunState,
    StopSignals,
    check_model,
    check_plan,
    diverged,
    interrupted,
    resume_command,
)

# Off the CPU the loss is read (a host-device sync) only every SYNC_EVERY steps and at
# evaluations; between them the host queues GPU work without waiting (nanoGPT: log_interval 10).
SYNC_EVERY = 10


def bits_per_char(loss: float, n_tokens: int, n_chars: int) -> float:
    """Nats per token -> bits per character, comparable across tokenizers."""
    return loss * n_tokens / max(n_chars, 1) / math.log(2)


class Trainer:
    """Owns a run: model, optimizer, data, and the output directory.

    `ids` are the corpus's token ids (e.g. the memory map from `data.token_ids`); without them
    the text is encoded here. `prepared` (a `bardlm prepare` folder, `data.load_prepared`)
    replaces text and ids: its shards are read through memory maps, split by document. `dist` is this process's place in a torchrun job (default: read
    from the environment; a plain run is a job of one).
    """

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
        ids: np.ndarray | None = None,
        dist: Dist | None = None,
        keep_vocab: bool = False,
        prepared: Prepared | None = None,
    ) -> None:
        # "auto" (or a device this machine lacks: one line) becomes the device itself.
        train_cfg = dataclasses.replace(train_cfg, device=str(resolve_device(train_cfg.device)))
        self.cfg, self.tokenizer, self.out = train_cfg, tokenizer, Path(out)
        self.dist = dist if dist is not None else Dist.from_env(train_cfg.device)
        main = self.dist.is_main
        self.progress, self.meta = show_progress(progress and main), dict(meta or {})
        self.log = log if main else (lambda msg: None)  # only rank 0 speaks
        # A model started from a checkpoint keeps its (maybe padded) vocabulary: see init_config.
        if model_cfg.vocab_size != tokenizer.vocab_size and not keep_vocab:
            model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
        self.model_cfg = model_cfg
        if prepared is not None:  # a `bardlm prepare` folder: its own split, by document
            self.train_split, self.val_split = prepared.train, prepared.val
            self.val_bytes = prepared.val_bytes
        else:
            if ids is None:
                ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
            self.train_split, self.val_split = split_ids(ids, len(text), train_cfg.val_fraction)
            # UTF-8 bytes of the validation text (from the character where the split falls), for
            # bits per byte: the unit of `bardlm eval`, which does not change with the tokenizer.
            self.val_bytes = len(text[self.train_split.n_chars:].encode("utf-8", "surrogatepass"))
        T = model_cfg.block_size
        self.batches = Batches(self.train_split.ids, T, train_cfg.seed)
        self.val = val_windows(self.val_split.ids, T)
        # A fixed, evenly spread validation subset for the evaluations during training.
        n_sub = min(len(self.val), train_cfg.eval_batches * train_cfg.batch_size)
        self.val_subset = self.val[torch.linspace(0, len(self.val) - 1, n_sub).long()]
        torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
        self.device = self.dist.device(train_cfg.device)
        self.model = self._build(model_cfg)  # the plain module: eval, save, count
        configure_memory(self.model, train_cfg)  # activation checkpointing, chunked loss
        if self.dist.enabled:
            torch.manual_seed(train_cfg.seed + 1000 * self.dist.rank)  # own dropout masks per rank
        self.signals = StopSignals()
        self.parallel = Parallel(self.model, train_cfg, self.dist, self.device, self.model.init_weights,
                                 stop=lambda: self.signals.signum is not None)
        self.loop = Loop(self.model, train_cfg, forward=self.parallel.forward,
                         grad_sync=self.parallel.grad_sync, reduce=self.parallel.reduce, device=self.device,
                         all_sum=self.dist.all_reduce_sum, world=self.dist.world)
        self.optimizer = self.loop.optimizer
        self.flops_per_token = flops_per_token(self.model)
        self.state = RunState(self.out, self.model, self.optimizer, tokenizer, self.dist,
                              self.device, train_cfg.fsdp, self.log)
        self.history: list[dict[str, Any]] = []
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY  # a CPU never waits

    @property
    def step(self) -> int:
        return self.loop.step

    def _build(self, cfg: ModelConfig) -> GPT:
        """The model on this rank's device (under FSDP built on meta, see `distributed.Parallel`)."""
        if self.cfg.fsdp:
            with torch.device("meta"):
                return GPT(cfg)
        return GPT(cfg).to(self.device)

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        d, cfg = self.dist, self.cfg
        return self.batches.batch(step, cfg.batch_size, d.rank, d.world, micro, cfg.grad_accum)

    def train_step(self, sync: bool = True) -> float:
        """One optimizer step over `grad_accum` micro-batches of every rank; returns the mean
        loss over the global batch (per-rank batch x world x grad_accum sequences), or NaN
        with sync=False (the loss is not read: see `Loop.train_step`)."""
        try:
            return self.loop.train_step(self._batch, sync=sync)
        except Diverged as e:
            raise diverged(e, self.out) from None

    # Evaluation -----------------------------------------------------------------------------
    def evaluate(self, windows: torch.Tensor, batch_size: int | None = None) -> float:
        """Mean next-token loss (nats) over validation windows (N, T + 1).

        Every rank evaluates all windows (FSDP needs all ranks in every forward); the result
        is the same on each.
        """
        bs = batch_size or self.cfg.batch_size * 4
        return evaluate(self.model, window_batches(windows, bs), self.device,
                        partial(autocast, self.cfg, self.device))

    def bpc(self, loss: float, split: Split) -> float:
        return bits_per_char(loss, len(split.ids), split.n_chars)

    # Checkpoints ----------------------------------------------------------------------------
    def run_meta(self) -> dict[str, Any]:
        return {
            **self.meta,
            "train": dataclasses.asdict(self.cfg),
            "step": self.step,
            "tokenizer": self.tokenizer.kind,
            "world_size": self.dist.world,
        }

    def save(self) -> None:
        self.state.save(self.step, self.history, self.run_meta())

    def init_from(self, path: str | Path) -> None:
        """Start from the weights of the model at `path` (any directory `bardlm.load` reads),
        with this run's fresh optimizer and schedule; the shape must be this run's."""
        from ..io.load import load

        if self.cfg.fsdp:
            raise BardlmError("--init-from with fsdp is not supported; use DDP (drop fsdp)")
        source, _ = load(path)
        if getattr(source, "quantization", None):
            raise BardlmError(f"--init-from {path} is quantized; start from the float checkpoint")
        check_model(source.config.to_dict(), self.model_cfg, "--init-from")
        with torch.no_grad():
            self.model.load_state_dict(source.state_dict())
        self.log(f"initialised from {path}")

    def resume(self) -> None:
        """Continue the run saved in `self.out`: same model, same plan (`state.check_plan`)."""
        from ..io.checkpoint import read_config

        saved = read_config(self.out)
        check_model(saved["model"], self.model_cfg)
        # A prepared folder changed since (prepared again): the step no longer names a place in it.
        fp, was = self.meta.get("data_fingerprint"), saved.get("data_fingerprint")
        if fp is not None and was is not None and fp != was:
            raise BardlmError(
                f"--resume: the data {self.meta.get('data')} is not the one this run trained on "
                "(its shards changed); resume with the same prepared folder, or start a new run"
            )
        cfg = check_plan(saved.get("train", {}), self.cfg, self.dist.world,
                         saved.get("world_size", 1), self.log)
        self.cfg = self.loop.cfg = cfg
        step, self.history, _ = self.state.resume()
        self.loop.step = step
        self.log(f"resumed {self.out} at step {self.step}")

    # The loop -------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to max_iters (or stop early at step `until`, saving a checkpoint there).

        Returns the final metrics, with the loss over the whole validation split.
        """
        cfg = self.cfg
        stop = min(until, cfg.max_iters) if until is not None else cfg.max_iters
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world * self.model_cfg.block_size
        bar = progress_bar(self.progress, cfg.max_iters, "train", initial=self.step)
        start, t0, last_loss, tok_s = time.time(), time.time(), float("nan"), 0.0
        synced_at = self.step
        elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        try:
            with self.signals:
                self.model.train()
                while self.step < stop:
                    nxt = self.step + 1
                    evaluating = nxt % cfg.eval_interval == 0 or nxt == cfg.max_iters
                    sync = evaluating or nxt == stop or nxt % self.sync_every == 0
                    loss = self.train_step(sync)
                    if bar is not None:
                        bar.update(1)
                    if sync:  # the loss has been read: the GPU has caught up, timings are true
                        now = time.time()
                        tok_s = tokens_per_step * (self.step - synced_at) / max(now - t0, 1e-9)
                        t0, synced_at, last_loss = now, self.step, loss
                        if bar is not None:
                            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}",
                                            grad_norm=f"{self.loop.grad_norm:.3g}")
                    if evaluating:
                        self._record(last_loss, tok_s, elapsed_before + time.time() - start)
                        t0 = time.time()  # the next step's tokens/s leaves out evaluating and saving
                    # Alone, stop at once; with other ranks, at the step they all heard of it.
                    alone_told = not self.dist.enabled and self.signals.signum is not None
                    if self.parallel.stop_agreed or alone_told:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            self.save()
            raise interrupted(self.step, resume_command("train", self.out)) from None
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
            "val_bpb_full": bits_per_char(full, len(self.val_split.ids), self.val_bytes),
            "val_windows": len(self.val),
            "elapsed_s": elapsed_before + time.time() - start,
        }
        if self.dist.is_main:
            self._append_metrics({"final": True, **final})
        self.log(
            f"step {self.step}: validation loss over the whole split {full:.4f} "
            f"({final['val_bpc_full']:.3f} bits/char, {final['val_bpb_full']:.3f} bits/byte, "
            f"{len(self.val)} windows)"
        )
        return final

    def _record(self, train_loss: float, tok_s: float, elapsed: float) -> None:
        val = self.evaluate(self.val_subset)
        row = {
            "step": self.step,
            "train_loss": train_loss,
            "val_loss": val,
            "val_bpc": self.bpc(val, self.val_split),
            "lr": self.loop.optimizer.param_groups[0]["lr"],
            "grad_norm": self.loop.grad_norm,
            **speed(tok_s, self.flops_per_token, self.device),
            "elapsed_s": elapsed,
        }
        self.history.append(row)
        # The line first: a kill right after the save must not lose it (a kill before the save
        # leaves a line past the checkpoint, which resuming drops: `state.trim_metrics`).
        if self.dist.is_main:
            self._append_metrics(row)
        if not self.progress:
            self.log(f"step {self.step}: train {train_loss:.4f} val {val:.4f}, grad norm "
                     f"{self.loop.grad_norm:.3g}, {describe(row)}")
        self.save()
        if self.dist.is_main:
            plot_losses(self.history, self.out / "loss.png")

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


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


def init_config(path: str | Path, preset_name: str | None, overrides: dict[str, Any],
                tokenizer_spec: str | None) -> tuple[ModelConfig, Tokenizer]:
    """(model config, tokenizer) of a run started from the model at `path`: both come from the
    checkpoint; a --preset, --set or --tokenizer that would change them is a one-line error."""
    from ..config import preset
    from ..io.load import kind_of, read_model_config
    from ..io.load import load as load_model

    if kind_of(path) in ("int8", "int4", "adapter"):
        raise BardlmError(f"--init-from {path}: pass a float checkpoint (merge or de-quantize first)")
    cfg = read_model_config(path)
    if tokenizer_spec is not None:
        raise BardlmError("--init-from takes the tokenizer of the checkpoint; drop --tokenizer")
    wanted = preset(preset_name).to_dict() if preset_name else {}
    shape = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in (*FREE_WITH_INIT, "extra")]
    for key in shape:
        for source, value in (("--set", overrides.get(key, getattr(cfg, key))),
                              (f"--preset {preset_name}", wanted.get(key, getattr(cfg, key)))):
            if value != getattr(cfg, key):
                raise BardlmError(
                    f"{source} gives {key}={value!r} but --init-from {path} has {key}="
                    f"{getattr(cfg, key)!r}; the shape comes from the checkpoint: drop it")
    _, tokenizer = load_model(path)
    if tokenizer is None:
        raise BardlmError(f"--init-from {path} has no tokenizer; it cannot read the training text")
    return cfg.replace(**{k: v for k, v in overrides.items() if k in FREE_WITH_INIT}), tokenizer


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into an existing run unless told to resume or overwrite it."""
    if not resume:
        claim_out(out, overwrite, "a run", "--resume to continue it or ")
    elif not (out.is_dir() and (out / CONFIG_FILE).exists()):
        claim_out(out, False)  # a file is named as such
        raise BardlmError(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a run")
    elif not (out / STATE_FILE).is_file():  # written by convert, export, quantize or merge
        raise BardlmError(f"--resume: {out} holds a model but no training state ({STATE_FILE}); "
                          f"start a new run from it with --init-from {out}")
