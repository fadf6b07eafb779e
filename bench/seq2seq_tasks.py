"""The issue-6 targets: reverse and sort (length 16, 10 symbols) trained from scratch on the CPU,
exact-sequence accuracy on 1000 held-out pairs and wall time; then the speed of cached decoding
(encoder once, cross K/V once, decoder KV cache) as a ratio against re-running the whole model
for every new token, measured in the same process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/seq2seq_tasks.py            # both tasks
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/seq2seq_tasks.py --tasks sort --norm pre
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/seq2seq_tasks.py --ckpt runs/reverse  # decode only
"""

from __future__ import annotations

import argparse
import time

import torch

from bardlm.seq2seq.model import BOS, EncoderDecoder, greedy_decode, load_seq2seq
from bardlm.seq2seq.tasks import PairSampler, TaskConfig, make_batch, train_seq2seq


@torch.no_grad()
def uncached_greedy(model: EncoderDecoder, src: torch.Tensor, max_len: int) -> torch.Tensor:
    """The baseline: the full encoder-decoder forward over the whole prefix for every token."""
    seq = torch.full((src.shape[0], 1), BOS)
    for _ in range(max_len):
        logits, _ = model(src, seq)
        logits[..., :2] = float("-inf")  # PAD, BOS are never generated (as in beam_search)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, 1:]


def decode_speed(model: EncoderDecoder, cfg: TaskConfig, reps: int = 5) -> None:
    src, _, targets = make_batch(cfg.task, PairSampler(cfg).test[:256])
    T = targets.shape[1]
    model.eval()
    fast = greedy_decode(model, src, T)
    slow = uncached_greedy(model, src, T)
    # Identical up to each row's EOS (the cached decoder pads after it).
    same = ((fast == slow) | (fast == 0)).all().item()
    times = {}
    for name, fn in (("uncached", uncached_greedy), ("cached", greedy_decode)):
        fn(model, src, T)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(model, src, T)
        times[name] = (time.perf_counter() - t0) / reps
    print(f"greedy decoding of 256 x {T} tokens: uncached {times['uncached'] * 1e3:.0f} ms, "
          f"cached {times['cached'] * 1e3:.0f} ms, speed-up {times['uncached'] / times['cached']:.2f}x "
          f"(same outputs: {same})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["reverse", "sort"])
    ap.add_argument("--norm", default="post", choices=["post", "pre"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", help="a `bardlm seq2seq` run: measure its decoding speed only")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.ckpt:
        import json
        from pathlib import Path

        task = json.loads((Path(args.ckpt) / "config.json").read_text())["task"]
        decode_speed(load_seq2seq(args.ckpt), TaskConfig(**task))
        return
    model = cfg = None
    for task in args.tasks:
        cfg = TaskConfig(task=task, seed=args.seed)
        t0 = time.time()
        model, final = train_seq2seq(cfg, cfg.model_config(norm_placement=args.norm), log=lambda m: None)
        print(f"{task:8s} length {cfg.length} vocab {cfg.vocab} ({args.norm}-norm): exact-sequence "
              f"accuracy greedy {final['seq_acc']:.4f}, beam {cfg.beam} "
              f"{final[f'seq_acc_beam{cfg.beam}']:.4f} on {final['n_test']} held-out pairs; "
              f"training {final['train_s']:.0f} s ({cfg.max_iters} steps), total {time.time() - t0:.0f} s")
    decode_speed(model, cfg)


if __name__ == "__main__":
    main()
