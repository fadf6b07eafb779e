"""Fast dropout masks vs F.dropout, in one process, on the tensors a GPT training step masks.

Times `dropout.dropout(x, p)` (16-bit slices of 64-bit random words) against `F.dropout(x, p)`
(one random float per element), forward alone and forward + backward, on the attention
probabilities (B, H, T, T) and the residual stream (B, T, C) of nanoGPT's shakespeare_char shape.
The last line is JSON: {"results": {case: {"fast_ms", "torch_ms", "speedup"}}}.

    python bench/dropout.py
    python bench/dropout.py --batch 4 --reps 2     # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bardlm.nn.dropout import dropout


def median_ms(fn, reps: int) -> float:  # noqa: ANN001
    """Median milliseconds of `fn()` over `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cases(batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """shakespeare_char's dropout inputs: 6 heads, context 256, 384 dims."""
    name = str(dtype).removeprefix("torch.")
    return {
        f"attention (B,6,256,256) {name}": torch.rand(batch, 6, 256, 256, dtype=dtype),
        f"residual (B,256,384) {name}": torch.randn(batch, 256, 384, dtype=dtype),
    }


def step(way: str, x: torch.Tensor, p: float, backward: bool):  # noqa: ANN201
    """A no-argument call: one dropout of `x` by `way` ("fast" or "torch"), and its backward."""
    x = x.clone().requires_grad_(backward)

    def run() -> None:
        y = dropout(x, p) if way == "fast" else F.dropout(x, p, training=True)
        if backward:
            y.sum().backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, x in cases(args.batch, dtype).items():
            for backward in (False, True):
                ms = {way: median_ms(step(way, x, args.p, backward), args.reps)
                      for way in ("fast", "torch")}
                key = f"{name}, {'forward+backward' if backward else 'forward'}"
                results[key] = {"fast_ms": round(ms["fast"], 2), "torch_ms": round(ms["torch"], 2),
                                "speedup": round(ms["torch"] / ms["fast"], 2)}
                print(f"{key:>52}: fast {ms['fast']:8.1f} ms  F.dropout {ms['torch']:8.1f} ms  "
                      f"x{ms['torch'] / ms['fast']:.2f}", flush=True)
    print(json.dumps({"batch": args.batch, "p": args.p, "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    main()
