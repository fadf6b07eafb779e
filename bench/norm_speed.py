"""LayerNorm vs RMSNorm: time per training step of the same model, in one process.

Builds the experiments' budget model (4 layers, 4 heads, 64 dims, context 64, batch 16; char
vocabulary of 65) once with `norm=layernorm` and once with `norm=rmsnorm`, and times full
training steps (forward, backward, AdamW) alternately: ABAB..., so a change of machine load
hits both. Reports the median ms per step of each, and their ratio per round (RMSNorm /
LayerNorm) with its median and spread across rounds.

A ratio is only meaningful on a quiet machine: with `os.getloadavg()[0]` >= 1 (other processes
want the cores) the script still runs but marks the result `"meaningful": false`.

    python bench/norm_speed.py                       # 7 rounds of 20 steps
    python bench/norm_speed.py --rounds 1 --steps 1  # a smoke test
    python bench/norm_speed.py --fused false         # the written-out norms (fused_ops=false)

The last line is JSON: {"load": ..., "meaningful": ..., "ms_per_step": {...}, "ratio_median": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bardlm.config import ModelConfig, TrainConfig
from bardlm.nn.model import GPT
from bardlm.train.loop import Loop


def make(norm: str, fused: bool, args: argparse.Namespace) -> tuple[Loop, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=65, block_size=args.context, n_layer=4, n_head=4, n_embd=args.n_embd,
                      bias=False, norm=norm, fused_ops=fused)
    model = GPT(cfg).train()
    x = torch.randint(0, 65, (args.batch, args.context))
    return Loop(model, TrainConfig(batch_size=args.batch, max_iters=10**6, lr=1e-3)), x, x.roll(-1, 1)


def ms_per_step(loop: Loop, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.train_step(lambda step, micro: (x, y))
    return (time.perf_counter() - t0) * 1000 / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="steps per timing")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--fused", default="true", choices=["true", "false"],
                   help="fused_ops: one kernel per norm (default) or the written-out formula")
    args = p.parse_args()
    fused = args.fused == "true"
    load_before = os.getloadavg()[0]
    runs = {norm: make(norm, fused, args) for norm in ("layernorm", "rmsnorm")}
    for loop, x, y in runs.values():
        ms_per_step(loop, x, y, 2)  # warm-up: allocator, thread pool
    times: dict[str, list[float]] = {norm: [] for norm in runs}
    for _ in range(args.rounds):
        for norm, (loop, x, y) in runs.items():
            times[norm].append(ms_per_step(loop, x, y, args.steps))
    ratios = [r / ln for r, ln in zip(times["rmsnorm"], times["layernorm"], strict=True)]
    load = max(load_before, os.getloadavg()[0])
    result = {
        "load": round(load, 2),
        "meaningful": load < 1.0,
        "threads": torch.get_num_threads(),
        "fused_ops": fused,
        "ms_per_step": {norm: round(statistics.median(t), 3) for norm, t in times.items()},
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_min_max": [round(min(ratios), 4), round(max(ratios), 4)],
    }
    if not result["meaningful"]:
        print(f"not meaningful: load average {load:.2f} >= 1 (other processes share the cores)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
