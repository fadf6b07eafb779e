"""The time cost of `step_in_backward` (each parameter updated during backward): one training
step with it against the normal step, same model, same batch, same run.

Updating in backward calls the optimizer once per parameter, so its fixed per-call cost (Python
and a few small kernels) is paid P times a step; on a small model with many parameters that
dominates, and that is what this measures (a 48-layer, 32-wide toy model: 580 parameters). On a
real model the step is dominated by the matmuls and the ratio goes to ~1 (bench/memory.py's
`ours_full_in_backward` row). The last line is JSON.

    python bench/step_in_backward.py [--layers 48] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bardlm.config import ModelConfig, TrainConfig
from bardlm.nn.model import GPT
from bardlm.train.loop import Loop


def step_ms(layers: int, steps: int, optimizer: str, in_backward: bool) -> float:
    """Mean milliseconds of a training step (after 3 warm-up steps) of the toy model."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=65, block_size=32, n_layer=layers, n_head=2, n_embd=32)).train()
    loop = Loop(model, TrainConfig(step_in_backward=in_backward, grad_clip=0.0, optimizer=optimizer, lr=1e-3,
                                   warmup_iters=0, max_iters=steps + 3))
    x, y = torch.randint(0, 65, (4, 32)), torch.randint(0, 65, (4, 32))
    for _ in range(3):
        loop.train_step(lambda s, m: (x, y))
    t = time.perf_counter()
    for _ in range(steps):
        loop.train_step(lambda s, m: (x, y))
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    n = sum(1 for _ in GPT(ModelConfig(vocab_size=65, block_size=32, n_layer=args.layers, n_head=2,
                                       n_embd=32)).parameters())
    out = {"layers": args.layers, "parameters": n, "load": round(load, 2)}
    for opt in ("foreach", "fused"):
        plain, inside = step_ms(args.layers, args.steps, opt, False), step_ms(args.layers, args.steps, opt, True)
        print(f"{opt:<8} normal step {plain:6.1f} ms, in backward {inside:6.1f} ms: x{inside / plain:.2f}")
        out[opt] = {"normal_ms": round(plain, 2), "in_backward_ms": round(inside, 2), "ratio": round(inside / plain, 3)}
    print(f"{n} parameters; load average at start {load:.1f}, {args.threads} thread(s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
