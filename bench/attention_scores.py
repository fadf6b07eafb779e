"""Cost of the attention scores of docs/concepts.md, relative to the fused scaled dot product.

Times one training step (forward + backward) of the same model with each `attn_score`, all in one
process, and prints the ratio to `dot` on the SDPA path (interleaved repeats, median per variant).

    OMP_NUM_THREADS=1 python bench/attention_scores.py [--width 64 --layers 4 --context 64 --batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bardlm import GPT
from bardlm.config import ModelConfig

VARIANTS = {
    "dot (sdpa)": dict(attn_score="dot", attn_impl="sdpa"),
    "dot (explicit)": dict(attn_score="dot", attn_impl="explicit"),
    "dot_unscaled": dict(attn_score="dot_unscaled"),
    "additive": dict(attn_score="additive"),
    "bilinear": dict(attn_score="bilinear"),
    "cosine": dict(attn_score="cosine"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="training steps per timing")
    args = p.parse_args()
    base = dict(vocab_size=65, block_size=args.context, n_layer=args.layers, n_head=args.heads,
                n_embd=args.width, bias=False)
    models = {name: GPT(ModelConfig(**base, **v)) for name, v in VARIANTS.items()}
    idx = torch.randint(0, 65, (args.batch, args.context))
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, model in models.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model(idx, idx)[1].backward()
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps)
    ref = statistics.median(times["dot (sdpa)"])
    print(f"{args.layers} layers, width {args.width}, {args.heads} heads, context {args.context}, "
          f"batch {args.batch}; {torch.get_num_threads()} threads")
    print("| attn_score | ms per step (forward + backward) | vs dot (sdpa) |")
    print("| --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
