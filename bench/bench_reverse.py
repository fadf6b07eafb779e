"""How long the reversal probe takes, and what it shows, with and without the causal mask.

    PYTHONPATH=src python bench/bench_reverse.py [--steps N] [--threads T]

Runs the default `bardlm reverse` configuration twice in one process (causal mask on, then the
debug model without it) and prints wall time, time per training step, and the probe's numbers.
The ratio line compares the two runs measured here, so it survives a noisy machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from bardlm.lab.reverse import ReverseConfig, run_reverse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=ReverseConfig().steps)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps")
    print(f"{'mask':<6} {'wall s':>7} {'ms/step*':>9} {'first':>6} {'second':>7} {'chance':>7}  verdict")
    walls = {}
    for causal in (True, False):
        t0 = time.perf_counter()
        r = run_reverse(ReverseConfig(steps=args.steps, causal=causal))
        wall = walls[causal] = time.perf_counter() - t0
        print(f"{'on' if causal else 'OFF':<6} {wall:7.1f} {1e3 * wall / args.steps:9.1f} "
              f"{r['first_half']:6.3f} {r['second_half']:7.3f} {r['chance']:7.3f}  {r['verdict']}")
    print("* wall time per step, evaluation of the held-out examples included")
    print(f"ratio: mask-off run / mask-on run wall time = {walls[False] / walls[True]:.2f}")


if __name__ == "__main__":
    main()
