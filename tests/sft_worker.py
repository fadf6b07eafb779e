"""Run by tests/test_sft.py under torchrun: short finetuning runs (full with DDP, full with FSDP2,
LoRA with DDP) of one base on one chat file; rank 0 writes each run's per-step losses and its
metrics rows to RESULTS (JSON).
Usage: torchrun --nproc_per_node=2 sft_worker.py BASE DATA OUT RESULTS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bardlm.config import TrainConfig
from bardlm.train.sft import Finetuner, LoRASpec

RUNS = {"ddp": dict(fsdp=False, lora=False), "fsdp": dict(fsdp=True, lora=False),
        "lora": dict(fsdp=False, lora=True)}


def tiny_finetune(base: str, data: str, out: str, batch_size: int, fsdp: bool = False,
                  lora: bool = False) -> tuple[Finetuner, list[float]]:
    """Four steps, gradient accumulation 2, a validation every 2 steps; returns every step's loss."""
    cfg = TrainConfig(batch_size=batch_size, grad_accum=2, max_iters=4, eval_interval=2, lr=3e-3,
                      warmup_iters=1, weight_decay=0.0, val_fraction=0.2, fsdp=fsdp)
    ft = Finetuner(base, data, out, cfg, LoRASpec(4, 8.0) if lora else None, log=lambda m: None)
    losses: list[float] = []
    step = ft.loop.train_step
    ft.loop.train_step = lambda batch: losses.append(step(batch)) or losses[-1]
    ft.fit()
    return ft, losses


if __name__ == "__main__":
    base, data, out, results = sys.argv[1:5]
    got: dict = {}
    for name, kw in RUNS.items():
        ft, losses = tiny_finetune(base, data, f"{out}/{name}", batch_size=2, **kw)
        rows = [json.loads(r) for r in (Path(out) / name / "metrics.jsonl").read_text().splitlines()] \
            if ft.dist.is_main else []
        got[name] = {"losses": losses, "metrics": rows, "world": ft.dist.world}
    if ft.dist.is_main:
        Path(results).write_text(json.dumps(got))
    ft.dist.close()
