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
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
