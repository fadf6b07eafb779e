"""Training: AdamW, warm-up + cosine schedule, clipping, accumulation, evaluation, checkpoints,
exact resume.

One training step:  (x, y) (B, T) --model--> logits (B, T, V) --cross-entropy--> loss
--backward--> grads (accumulated over `grad_accum` micro-batches) --clip--> AdamW step.
Every `eval_interval` steps: validation loss and bits per character -> metrics.jsonl, loss.png
and a checkpoint that `--resume` continues from exactly.

Fast paths, each a switch: `attn_impl` (model config; SDPA by default), `compile`
(torch.compile), `dtype="bf16"` (autocast), `optimizer` ("fused", "foreach" or "loop" AdamW, or
"muon": Muon for the blocks' weight matrices and fused AdamW for the rest).
Several processes: run under `torchrun` (see `distributed.py`); `fsdp=True` shards the model
with FSDP2's `fully_shard` instead of replicating it with DDP.
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
from .distributed import Dist
from .errors import BardlmError
from .model import GPT
from .tokenizers import Tokenizer

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_IMPLS = ("fused", "foreach", "loop", "muon")


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
    compile: bool = False  # torch.compile the training forward/backward (eval stays eager)
    optimizer: str = "foreach"  # AdamW kernel: "fused" (one kernel), "foreach", "loop"; or "muon"
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of DDP

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_iters", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise BardlmError(f"train: {name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise BardlmError(f"train: lr must be positive and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if self.dtype not in ("fp32", "bf16"):
            raise BardlmError(f"train: dtype must be fp32 or bf16, got {self.dtype!r} (fp16 is unusable on CPU)")
        if self.optimizer == "muon" and self.fsdp:
            raise BardlmError("train: optimizer=muon orthogonalises whole matrices, which FSDP "
                              "shards; use DDP (drop fsdp) or optimizer=fused")
        if self.optimizer not in OPTIMIZER_IMPLS:
            raise BardlmError(
                f"train: optimizer must be one of {', '.join(OPTIMIZER_IMPLS)}, got {self.optimizer!r}"
            )
        if not 0 < self.val_fraction < 1:
            raise BardlmError(f"train: val_fraction must be in (0, 1), got {self.val_fraction}")


# Training budgets of the presets (model shapes are in config.PRESETS under the same names).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU budget (batch 12, 2000 iterations); a peak lr of 2e-3 (nanoGPT: 1e-3)
    # reaches 1.81 instead of 1.89 with the same steps.
    "char-tiny": dict(batch_size=12, max_iters=2000, lr=2e-3, min_lr=2e-4, warmup_iters=100),
    "llama-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "qwen3-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    # 5 minutes on a 2-core CPU: bf16 autocast + torch.compile, Muon (about 2.1M tokens).
    "char-5min": dict(batch_size=16, max_iters=500, lr=3e-3, min_lr=3e-4, warmup_iters=30,
                      eval_interval=250, eval_batches=2, dtype="bf16", compile=True,
                      optimizer="muon"),
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: biases, norms and gains stay undecayed.

    optimizer="muon": the weight matrices inside the blocks go to Muon instead (see `MuonAdamW`).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and _is_hidden_matrix(n)]
        if hidden:
            return MuonAdamW(hidden, [(n, p) for n, p in params if not (p.dim() == 2 and _is_hidden_matrix(n))], cfg)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    # Same update, three kernels: "fused" does every parameter in one kernel, "foreach" batches
    # the tensor ops across parameters, "loop" is the plain per-parameter Python loop.
    impl = dict(fused=dict(fused=True), foreach=dict(foreach=True), loop=dict(foreach=False),
                muon=dict(fused=True))
    return torch.optim.AdamW(_adamw_groups(decay, no_decay, cfg), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), **impl[cfg.optimizer])


def _adamw_groups(decay: list, no_decay: list, cfg: TrainConfig) -> list[dict[str, Any]]:
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_hidden_matrix(name: str) -> bool:
    """A block's weight matrix (attention and MLP projections), not an embedding or the head:
    those map tokens, not hidden features, and Muon's orthogonalised step does not suit them."""
    return ".h." in f".{name}" and name.endswith(".weight")


class MuonAdamW(torch.optim.Optimizer):
    """Muon (`torch.optim.Muon`) for the blocks' weight matrices, fused AdamW for everything else.

    Muon replaces each matrix's momentum by the nearest orthogonal matrix (5 Newton-Schulz
    iterations) before stepping: every direction of the update moves at the same rate, which
    trains small models in markedly fewer steps (Jordan et al., 2024). With
    adjust_lr_fn="match_rms_adamw" (Moonshot, 2025) its update has AdamW's RMS, so one learning
    rate and schedule drive both halves.

    One Optimizer over both: its groups are the Muon groups then the AdamW groups (the very same
    dicts), and its `state` is shared, so `state_dict`, checkpoints and exact resume work as
    for plain AdamW.
    """

    def __init__(self, hidden: list[torch.Tensor], rest: list[tuple[str, torch.Tensor]], cfg: TrainConfig) -> None:
        self.muon = torch.optim.Muon(
            [{"params": hidden, "weight_decay": cfg.weight_decay}], lr=cfg.lr,
            adjust_lr_fn="match_rms_adamw",
        )
        decay = [p for _, p in rest if p.dim() >= 2]
        no_decay = [p for _, p in rest if p.dim() < 2]
        self.adamw = torch.optim.AdamW(_adamw_groups(decay, no_decay, cfg), lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), fused=True)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._link()

    def _link(self) -> None:
        """Point the two inner optimizers at this one's groups and state (after (re)loading)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state mapping
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002
        self.muon.step()
        self.adamw.step()


def bits_per_char(loss: float, n_tokens: int, n_chars: int) -> float:
    """Nats per token -> bits per character, comparable across tokenizers."""
    return loss * n_tokens / max(n_chars, 1) / math.log(2)


class Trainer:
    """Owns a run: model, optimizer, data, and the output directory.

    `ids` are the corpus's token ids (e.g. the memory map from `data.token_ids`); without them
    the text is encoded here. `dist` is this process's place in a torchrun job (default: read
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
    ) -> None:
        self.cfg, self.tokenizer, self.out = train_cfg, tokenizer, Path(out)
        self.dist = dist if dist is not None else Dist.from_env(train_cfg.device)
        main = self.dist.is_main
        self.progress, self.meta = progress and main, dict(meta or {})
        self.log = log if main else (lambda msg: None)  # only rank 0 speaks
        if model_cfg.vocab_size != tokenizer.vocab_size:
            model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
        self.model_cfg = model_cfg
        if ids is None:
            ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        self.train_split, self.val_split = split_ids(ids, len(text), train_cfg.val_fraction)
        T = model_cfg.block_size
        self.batches = Batches(self.train_split.ids, T, train_cfg.seed)
        self.val = val_windows(self.val_split.ids, T)
        # A fixed, evenly spread validation subset for the evaluations during training.
        n_sub = min(len(self.val), train_cfg.eval_batches * train_cfg.batch_size)
        self.val_subset = self.val[torch.linspace(0, len(self.val) - 1, n_sub).long()]
        torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
        self.device = self.dist.device(train_cfg.device)
        self.model = GPT(model_cfg).to(self.device)  # the plain module: eval, save, count
        if self.dist.enabled:
            torch.manual_seed(train_cfg.seed + 1000 * self.dist.rank)  # own dropout masks per rank
        self.train_model = self._parallelize(self.model)  # what the training step calls
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None
        self._stop_agreed = False

    def _parallelize(self, model: GPT) -> torch.nn.Module:
        """Shard (FSDP2) or replicate (DDP) across ranks, and compile if asked."""
        cfg = self.cfg
        if cfg.fsdp:
            if not self.dist.enabled:
                raise BardlmError("fsdp=true needs several processes: start the run with torchrun")
            from torch.distributed.fsdp import fully_shard

            # One unit per block: a block's weights are gathered just before it runs and freed
            # after, so a rank holds 1/world of the model plus one whole block at a time.
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
        train_model: torch.nn.Module = torch.compile(model) if cfg.compile else model
        if self.dist.enabled and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DDP(train_model, device_ids=ids)
        return train_model

    # Evaluation -----------------------------------------------------------------------------
    def _autocast(self):  # noqa: ANN202
        if self.cfg.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor, batch_size: int | None = None) -> float:
        """Mean next-token loss (nats) over validation windows (N, T + 1).

        Every rank evaluates all windows (FSDP needs all ranks in every forward); the result
        is the same on each.
        """
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
    def _grad_sync(self, last_micro: bool):  # noqa: ANN202
        """Average gradients across ranks only after the last micro-batch of a step."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(last_micro)
        elif self.dist.enabled and not last_micro:
            return self.train_model.no_sync()
        return nullcontext()

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches of every rank; returns the mean
        loss over the global batch (per-rank batch x world x grad_accum sequences)."""
        cfg, d = self.cfg, self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.batches.batch(self.step, cfg.batch_size, d.rank, d.world, micro, cfg.grad_accum)
            x, y = x.to(self.device), y.to(self.device)
            with self._grad_sync(micro == cfg.grad_accum - 1):
                with self._autocast():
                    _, loss = self.train_model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        # One all-reduce carries the loss and "some rank was told to stop", so all ranks agree.
        stop = float(self._stop_signal is not None)
        stats = d.all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(stop, device=self.device)]))
        total = stats[0].item() / d.world
        # Act on a signal only once every rank knows of it: all stop at the same step boundary.
        self._stop_agreed = stats[1].item() > 0
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
            "world_size": self.dist.world,
        }

    def _full_states(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """(model tensors or None for "the module's own", optimizer state with integer keys).

        Under FSDP every rank holds a shard, so both are gathered (a collective call that all
        ranks make) into whole tensors on rank 0.
        """
        if not self.cfg.fsdp:
            return None, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=opts)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        # Parameter names -> the integer numbering of optimizer.state_dict().
        index = {n: i for i, n in enumerate(self._optimizer_param_names())}
        state = {index[n]: s for n, s in osd.get("state", {}).items()}
        return sd, {"state": state, "param_groups": osd.get("param_groups", [])}

    def _optimizer_param_names(self) -> list[str]:
        """Parameter names in the optimizer's order (group by group), the order its integer
        state keys follow."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def save(self) -> None:
        """Weights, config, tokenizer, optimizer, every rank's RNG and the step: all replaced or
        none. Every rank calls it (states are gathered); only rank 0 writes."""
        sd, opt = self._full_states()
        rngs = self.dist.all_gather_objects(_rng_state(self.device))
        if not self.dist.is_main:
            return
        tensors = {
            f"state.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()
        }
        for rank, states in enumerate(rngs):
            tensors.update({f"rng.{kind}.{rank}": t for kind, t in states.items()})
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        sizes = [len(g["params"]) for g in self.optimizer.param_groups]
        state = {"step": self.step, "param_groups": groups, "group_sizes": sizes, "history": self.history}
        writes = checkpoint_writes(self.out, self.model, self.tokenizer, self.run_meta(), sd=sd)
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
        weights = load_tensors(self.out / "model.safetensors")
        tensors = load_tensors(self.out / OPTIMIZER_FILE)
        self._restore_rng(tensors, meta.get("world_size", 1))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, i, name = key.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = value
        # Parameter indices run through the groups in order: rebuild each group's index list.
        sizes = state.get("group_sizes") or [len(g["params"]) for g in self.optimizer.param_groups]
        starts = np.cumsum([0, *sizes])
        groups = [
            {**g, "params": list(range(starts[j], starts[j + 1]))}
            for j, g in enumerate(state["param_groups"])
        ]
        if self.cfg.fsdp:
            self._load_sharded(weights, opt_state, groups)
        else:
            load_state(self.model, weights, str(self.out))
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.step, self.history = state["step"], state["history"]
        self.log(f"resumed {self.out} at step {self.step}")

    def _restore_rng(self, tensors: dict[str, torch.Tensor], saved_world: int) -> None:
        rank = self.dist.rank
        if f"rng.torch.{rank}" not in tensors:
            self.log(f"note: the checkpoint has no RNG state for rank {rank}; dropout draws differ")
            return
        if saved_world != self.dist.world:
            self.log(f"note: resuming a {saved_world}-process run on {self.dist.world}: data "
                     f"order continues, but losses will not match an uninterrupted run exactly")
        torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        if self.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], self.device)

    def _load_sharded(self, weights: dict[str, torch.Tensor], opt_state: dict, groups: list) -> None:
        """Scatter whole tensors from the checkpoint into this rank's FSDP shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        if self.model_cfg.tie_embeddings:
            weights = {**weights, "lm_head.weight": weights["transformer.wte.weight"]}
        set_model_state_dict(self.model, weights, options=opts)
        names = self._optimizer_param_names()
        osd = {
            "state": {names[i]: s for i, s in opt_state.items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups],
        }
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=opts)

    # The loop -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop_signal = signum  # handled at the next step boundary, never mid-save

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to max_iters (or stop early at step `until`, saving a checkpoint there).

        Returns the final metrics, with the loss over the whole validation split.
        """
        cfg = self.cfg
        stop = min(until, cfg.max_iters) if until is not None else cfg.max_iters
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world * self.model_cfg.block_size
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
                # Alone, stop at once; with other ranks, at the step they all heard of it.
                alone_told = not self.dist.enabled and self._stop_signal is not None
                if self._stop_agreed or alone_told:
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
        if self.dist.is_main:
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
        if self.dist.is_main:
            self._append_metrics(row)
            plot_losses(self.history, self.out / "loss.png")
        if not self.progress:
            self.log(f"step {self.step}: train {train_loss:.4f} val {val:.4f}")

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random state (dropout masks): CPU, and the GPU's when training on one."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


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
