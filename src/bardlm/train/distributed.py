"""Multi-process training on PyTorch's own engine: torchrun + torch.distributed, nothing home-made.

`torchrun --nproc_per_node=N -m bardlm train ...` starts N processes and sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each; `Dist.from_env` reads them, joins the process
group (gloo on CPU, nccl on CUDA) and picks this process's device. A plain `bardlm train` sees no
WORLD_SIZE and gets the single-process `Dist()`, for which every helper here is a no-op.

How the work is split: each rank trains on its own micro-batches (`Batches.batch(step, B, rank,
world)`), DDP averages the gradients (or FSDP2 reduce-scatters them), and only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import BardlmError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job: rank r of `world`, and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, evaluates into metrics.jsonl and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> Dist:
        """Join the torchrun job described by the environment, if there is one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise BardlmError(f"--device {device}: CUDA is not available; use --device cpu (gloo)")
        if not dist.is_initialized():
            # nccl moves CUDA tensors between GPUs; gloo is the CPU backend.
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local_rank)
        return cls(rank=rank, world=world, local_rank=local_rank)

    def device(self, requested: str) -> torch.device:
        """One GPU per process on CUDA (cuda:LOCAL_RANK); every process shares the CPU."""
        if self.enabled and requested.startswith("cuda"):
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over all ranks (in place), or `t` itself in a single process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (used for per-rank RNG states)."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class Parallel:
    """One model made ready to train on every rank: compiled if asked, then sharded (FSDP2,
    `cfg.fsdp`) or replicated (DDP); with one process, just (maybe) compiled. Pretraining
    (`trainer.Trainer`) and finetuning (`sft.Finetuner`) both train through it, so each takes
    `compile`, `fsdp` and torchrun the same way.

    model:   the plain module (eval, save and count go through it); with fsdp it is sharded in
             place. Built on the meta device it is then allocated (to_empty) and `init` runs.
    forward: what a training step calls (`Loop(forward=...)`).
    stop:    () -> "this rank was told to stop"; `reduce` shares it, so all ranks stop together.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, dist_: Dist, device: torch.device,
                 init: Callable[[], None] | None = None, stop: Callable[[], bool] = lambda: False) -> None:
        self.model, self.cfg, self.dist, self.device, self.stop = model, cfg, dist_, device, stop
        self.stop_agreed = False
        if cfg.fsdp:
            if not dist_.enabled:
                raise BardlmError("fsdp=true needs several processes: start the run with torchrun")
            from torch.distributed.fsdp import fully_shard

            # One unit per block: a block's weights are gathered just before it runs and freed
            # after, so a rank holds 1/world of the model plus one whole block at a time.
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
            if any(p.is_meta for p in model.parameters()):
                # Built on meta and sharded: only now does each rank allocate its own shard.
                model.to_empty(device=device)
                if init is not None:
                    init()
        forward: torch.nn.Module = torch.compile(model) if cfg.compile else model
        if dist_.enabled and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = forward

    def grad_sync(self, last_micro: bool) -> AbstractContextManager:
        """Average gradients across ranks only after the last micro-batch of a step."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(last_micro)
        elif self.dist.enabled and not last_micro:
            return self.forward.no_sync()
        return nullcontext()

    def reduce(self, loss: torch.Tensor) -> float:
        """The global batch's loss (the mean of the ranks' 0-d `loss`); the same all-reduce
        carries "some rank was told to stop" into `stop_agreed`."""
        flag = torch.tensor(float(self.stop()), device=loss.device)
        stats = self.dist.all_reduce_sum(torch.stack([loss, flag]))
        self.stop_agreed = stats[1].item() > 0
        return stats[0].item() / self.dist.world
