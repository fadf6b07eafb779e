"""Run by tests/test_train_speed.py under torchrun: tiny training runs whose per-step losses rank 0
writes to LOSSES (JSON): {"ddp": [...], "fsdp": [...], "ddp_ckpt": [...], "fsdp_ckpt": [...]};
each FSDP run stops at step 3 and is resumed from its checkpoint, so it also checks sharded
save/resume. The *_ckpt runs recompute every block's activations in backward and compute the
loss in chunks (issue 28), which must not change a loss.
Usage: torchrun --nproc_per_node=2 ddp_worker.py OUT LOSSES
"""

from __future__ import annotations

import json
import sys

from bardlm.config import ModelConfig
from bardlm.tokenizers import CharTokenizer
from bardlm.train import TrainConfig, Trainer

TEXT = "".join(f"{i} little pigs went to market, and {i * 7 % 13} came home.\n" for i in range(400))


def tiny_run(
    out: str, batch_size: int, fsdp: bool = False, until: int | None = None, resume: bool = False,
    lean: bool = False,
) -> tuple[Trainer, list[float]]:
    """Six steps of a 2-layer model, gradient accumulation 2, no dropout (masks differ by rank).
    lean: activation checkpointing and a chunked loss."""
    tok = CharTokenizer.train(TEXT)
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tc = TrainConfig(batch_size=batch_size, grad_accum=2, max_iters=6, eval_interval=3,
                     eval_batches=2, warmup_iters=2, fsdp=fsdp, checkpoint_activations=lean,
                     loss_chunk=5 if lean else 0)
    trainer = Trainer(mc, tc, tok, TEXT, out, progress=False, log=lambda m: None)
    if fsdp:  # each rank holds its shard only: about half of the parameters, never all
        local = sum(p.to_local().numel() for p in trainer.model.parameters())
        full = sum(p.numel() for p in trainer.model.parameters())
        assert local <= full // trainer.dist.world + 100, (local, full)
    if resume:
        trainer.resume()
    losses: list[float] = []
    step = trainer.train_step
    trainer.train_step = lambda sync=True: losses.append(step(sync)) or losses[-1]  # record every step's loss
    trainer.fit(until=until)
    return trainer, losses


if __name__ == "__main__":
    out, losses_path = sys.argv[1], sys.argv[2]
    _, ddp = tiny_run(f"{out}/ddp", batch_size=3)
    _, fsdp = tiny_run(f"{out}/fsdp", batch_size=3, fsdp=True, until=3)
    trainer, fsdp_rest = tiny_run(f"{out}/fsdp", batch_size=3, fsdp=True, resume=True)
    _, ddp_ckpt = tiny_run(f"{out}/ddp_ckpt", batch_size=3, lean=True)
    _, fsdp_ckpt = tiny_run(f"{out}/fsdp_ckpt", batch_size=3, fsdp=True, until=3, lean=True)
    _, fsdp_ckpt_rest = tiny_run(f"{out}/fsdp_ckpt", batch_size=3, fsdp=True, resume=True, lean=True)
    if trainer.dist.is_main:
        with open(losses_path, "w") as f:
            json.dump({"ddp": ddp, "fsdp": fsdp + fsdp_rest, "ddp_ckpt": ddp_ckpt,
                       "fsdp_ckpt": fsdp_ckpt + fsdp_ckpt_rest, "world": trainer.dist.world}, f)
    trainer.dist.close()
