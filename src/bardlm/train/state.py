"""Run state: what a checkpoint of a training run holds beyond the model, and how it comes back.

A run directory holds the checkpoint (`io.checkpoint`: weights, config, tokenizer) plus the
optimizer state, every rank's random state and the step, all written as one all-or-nothing save
with one `save_id`. `--resume` restores them, so the losses continue exactly; the plan of the
run (batch, accumulation, seed, schedule, optimizer) must not change, and a changed `max_iters`
keeps the schedule as planned (see `check_plan`). Under FSDP the sharded states are gathered into
the same single-file format, and scattered back on resume.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, TrainConfig
from ..errors import BardlmError, Interrupted
from ..io.atomic import atomic_write_many, atomic_write_text, tensors_writer, text_writer
from ..io.checkpoint import (
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    checkpoint_writes,
    load_state,
    load_tensors,
    new_save_id,
    read_config,
)
from ..tokenizers import Tokenizer
from .distributed import Dist

# TrainConfig fields that are the run's plan: changing one on resume would not continue the run.
# (lr_decay_iters too, compared as the horizon it plans: see `check_plan`.)
PLAN_FIELDS = ("grad_accum", "seed", "lr", "min_lr", "warmup_iters", "schedule", "decay_fraction",
               "weight_decay",
               "beta1", "beta2", "eps", "grad_clip", "optimizer", "val_fraction")


def check_plan(saved: dict[str, Any], new: TrainConfig, world: int, saved_world: int,
               log: Any = print) -> TrainConfig:
    """The config a resumed run continues with: the saved plan, or a one-line refusal.

    Only `max_iters` (and fields that do not change the arithmetic: eval_interval, eval_batches,
    device, dtype, compile, fsdp) may differ. The cosine decay keeps its planned horizon
    (`lr_decay_iters`, else the old max_iters), so the learning rate never jumps back up when
    max_iters grows: steps past the horizon run at `min_lr`.
    """
    if not saved:  # not a training run's checkpoint: `RunState.resume` says so
        return new
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    old = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
    horizon = old.lr_decay_iters or old.max_iters  # where the planned decay reaches min_lr
    if new.lr_decay_iters is None and new.max_iters != horizon:
        new = dataclasses.replace(new, lr_decay_iters=horizon)
    plan = {k: (getattr(old, k), getattr(new, k)) for k in PLAN_FIELDS}
    # The AdamW kernels compute the same update from the same state: only muon is another plan.
    plan["optimizer"] = tuple("muon" if o == "muon" else "adamw" for o in plan["optimizer"])
    plan["lr_decay_iters"] = (horizon, new.lr_decay_iters or new.max_iters)
    plan["global batch (batch_size x processes)"] = (saved_world * old.batch_size, world * new.batch_size)
    for k, (was, now) in plan.items():
        if was != now:
            raise BardlmError(
                f"--resume: {k} was {was!r} in this run and is now {now!r}; a resumed run keeps "
                "its plan: drop the change, or start a new run with --overwrite (or another --out)"
            )
    if new.max_iters != old.max_iters and new.schedule == "cosine":
        log(f"note: max_iters {old.max_iters} -> {new.max_iters}; the schedule keeps its planned "
            f"decay to step {horizon}, later steps run at min_lr {new.min_lr:g}")
    return new


# Fields --set may change on a model started from a checkpoint (--init-from): they do not touch
# its weights. A resumed run changes none of them.
FREE_WITH_INIT = ("dropout", "emb_dropout", "attn_dropout", "resid_dropout", "fast_dropout",
                  "attn_impl", "fused_ops")


def check_model(saved: dict[str, Any], cfg: ModelConfig, flag: str = "--resume") -> None:
    old = ModelConfig.from_dict(saved)
    diff = [f.name for f in dataclasses.fields(ModelConfig) if getattr(old, f.name) != getattr(cfg, f.name)
            and (flag == "--resume" or f.name not in (*FREE_WITH_INIT, "extra"))]
    if diff:
        k = diff[0]
        raise BardlmError(
            f"{flag}: the model's {k} was {getattr(old, k)!r} and is now {getattr(cfg, k)!r}; "
            "resume with the run's own --preset and --set, or start a new run"
        )


def resume_command(verb: str, out: Path, *flags: str) -> str:
    """The shell command that continues the run in `out` (said when a signal stops it)."""
    return shlex.join(["bardlm", verb, *flags, "--resume", "--out", str(out)])


def interrupted(step: int, command: str) -> Interrupted:
    return Interrupted(f"interrupted at step {step}; checkpoint saved, continue with: {command}")


def diverged(error: Exception, out: Path) -> BardlmError:
    """A NaN/inf loss: say whether a checkpoint from before it exists (none before the first save)."""
    if (out / STATE_FILE).is_file():
        return BardlmError(f"{error}; the last good checkpoint in {out} is kept")
    return BardlmError(f"{error}; no checkpoint was saved before it (fix the settings and start again)")


def trim_metrics(out: Path, step: int) -> None:
    """Drop metrics.jsonl lines past the checkpoint's step: the trainer writes a step's line
    before saving it (so a completed save never lacks its line), so a crash in between leaves
    a line that the resumed run writes again."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _metrics_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _metrics_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return float("inf")  # a line cut by a crash


class StopSignals:
    """SIGINT/SIGTERM set `.signum` instead of killing the process: the run stops at the next
    step boundary and saves, never in the middle of a save."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class RunState:
    """Save and restore a run: model, optimizer, RNG of every rank, step and history.

    trainable_only: the weights file holds only the parameters that train (a LoRA adapter,
    `train.sft`), not the frozen base they sit on.
    """

    def __init__(self, out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 tokenizer: Tokenizer | None, dist: Dist, device: torch.device, fsdp: bool,
                 log: Any = print, trainable_only: bool = False) -> None:
        self.out, self.model, self.optimizer, self.tokenizer = out, model, optimizer, tokenizer
        self.dist, self.device, self.fsdp, self.log = dist, device, fsdp, log
        self.trainable_only = trainable_only

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors of the parameters that train, by state_dict name."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.model.state_dict().items() if n in names}

    def _full_states(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """(model tensors or None for "the module's own", optimizer state with integer keys).

        Under FSDP every rank holds a shard, so both are gathered (a collective call that all
        ranks make) into whole tensors on rank 0.
        """
        if not self.fsdp:
            sd = self.trainable_state() if self.trainable_only else None
            return sd, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=opts)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        index = {n: i for i, n in enumerate(self._param_names())}
        state = {index[n]: s for n, s in osd.get("state", {}).items()}
        return sd, {"state": state, "param_groups": osd.get("param_groups", [])}

    def _param_names(self) -> list[str]:
        """Parameter names in the optimizer's order (group by group), the order its integer
        state keys follow."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def save(self, step: int, history: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        """Weights, config, tokenizer, optimizer, every rank's RNG and the step: all replaced or
        none, with one save_id. Every rank calls it (states are gathered); only rank 0 writes."""
        sd, opt = self._full_states()
        rngs = self.dist.all_gather_objects(_rng_state(self.device))
        try:
            if self.dist.is_main:
                self._write(step, history, meta, sd, opt, rngs)
        finally:  # no rank goes on (and perhaps reads the folder, to resume) while rank 0 writes
            self.dist.barrier()

    def _write(self, step: int, history: list[dict[str, Any]], meta: dict[str, Any],
               sd: dict[str, torch.Tensor] | None, opt: dict[str, Any], rngs: list) -> None:
        save_id = new_save_id()
        tensors = {f"state.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        for rank, states in enumerate(rngs):
            tensors.update({f"rng.{kind}.{rank}": t for kind, t in states.items()})
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        sizes = [len(g["params"]) for g in self.optimizer.param_groups]
        state = {"step": step, "param_groups": groups, "group_sizes": sizes, "history": history,
                 "save_id": save_id}
        writes = checkpoint_writes(self.out, self.model, self.tokenizer, {**meta, "step": step},
                                   sd=sd, save_id=save_id)
        writes += [
            (self.out / OPTIMIZER_FILE, tensors_writer(tensors, {"step": str(step), "save_id": save_id})),
            (self.out / STATE_FILE, text_writer(json.dumps(state))),
        ]
        atomic_write_many(writes)

    def resume(self) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
        """Restore weights, optimizer and RNG from `out`; returns (step, history, config dict)."""
        meta = read_config(self.out)
        state_path = self.out / STATE_FILE
        if not state_path.is_file():
            raise BardlmError(f"{self.out} has no {STATE_FILE}; it cannot be resumed (train anew with --overwrite)")
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("no step")
            if not isinstance(state.get("history"), list) or not isinstance(state.get("param_groups"), list):
                raise ValueError("no history or param_groups")
        except (UnicodeDecodeError, ValueError) as e:
            raise BardlmError(f"{state_path} is damaged ({e}); the run cannot be resumed: restore "
                              "the folder whole, or start again with --overwrite") from None
        save_id = meta.get("save_id")
        if state.get("save_id") != save_id:
            raise BardlmError(
                f"{state_path} comes from another save than {self.out / 'config.json'}: the run "
                "folder mixes two checkpoints; restore it whole"
            )
        weights = load_tensors(self.out / MODEL_FILE, save_id)
        tensors = load_tensors(self.out / OPTIMIZER_FILE, save_id)
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
        if self.fsdp:
            self._load_sharded(weights, opt_state, groups)
        elif self.trainable_only:
            expected = set(self.trainable_state())
            if set(weights) != expected:
                raise BardlmError(f"{self.out / MODEL_FILE} holds other tensors than this run "
                                  f"trains ({sorted(set(weights) ^ expected)[:3]}); resume with "
                                  "the run's own LoRA settings")
            self.model.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        else:
            load_state(self.model, weights, str(self.out))
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if self.dist.is_main:
            trim_metrics(self.out, state["step"])
        return state["step"], state["history"], meta

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
        if self.model.config.tie_embeddings:
            weights = {**weights, "lm_head.weight": weights["transformer.wte.weight"]}
        set_model_state_dict(self.model, weights, options=opts)
        names = self._param_names()
        osd = {
            "state": {names[i]: s for i, s in opt_state.items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups],
        }
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=opts)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random state (dropout masks): CPU, and the GPU's when training on one."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states
