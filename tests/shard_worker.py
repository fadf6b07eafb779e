"""Run by tests/test_prepare.py under torchrun: a tiny run on a prepared folder (memory-mapped
shards), 3 sequences x 2 accumulation per rank; rank 0 writes every step's loss and each rank's
first batch row to LOSSES (JSON).
Usage: torchrun --nproc_per_node=2 shard_worker.py DATA OUT LOSSES
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_prepare import losses_of, tiny_trainer

if __name__ == "__main__":
    data, out, losses_path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    trainer = tiny_trainer(out, data, batch_size=3, grad_accum=2)
    d = trainer.dist
    # Each rank's own first window of step 0, gathered to compare: they must differ.
    x, _ = trainer.batches.batch(0, 3, d.rank, d.world, 0, 2)
    rows = [torch.zeros_like(x[0]) for _ in range(d.world)]
    torch.distributed.all_gather(rows, x[0].contiguous())
    losses = losses_of(trainer)
    if d.is_main:
        with open(losses_path, "w") as f:
            json.dump({"losses": losses, "first_rows": [r.tolist() for r in rows]}, f)
    d.close()
