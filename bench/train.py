"""Training throughput and model FLOPs utilisation (MFU) of each fast path, in one process.

For nanoGPT's CPU "baby GPT" shape and its shakespeare_char shape, times the real training step
(`Trainer.train_step`: data, forward, backward, clipping, AdamW) in each mode, and divides the
model FLOPs per second by the matmul peak measured at the start of the same run (fp32 peak for
fp32 modes, bf16 peak for bf16 modes). Ratios are against eager fp32 of the same shape.
The last line is JSON: {"peak_gflops": {...}, "results": {shape: {mode: {tokens_per_sec, mfu,
speedup}}}}.

    PYTHONPATH=src python bench/train.py                       # everything (minutes)
    PYTHONPATH=src python bench/train.py --shapes baby --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from bardlm.config import ModelConfig
from bardlm.tokenizers import CharTokenizer
from bardlm.train import TrainConfig, Trainer
from bardlm.train.data import load_corpus
from bardlm.train.speed import flops_per_token as model_flops_per_token

# name -> (model fields, batch size); vocab 65 (tiny Shakespeare's characters).
SHAPES = {
    "baby": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0), 12),
    "shakespeare_char": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2), 64),
}
# name -> (compile, dtype)
MODES = {
    "eager_fp32": (False, "fp32"),
    "compiled_fp32": (True, "fp32"),
    "eager_bf16": (False, "bf16"),
    "compiled_bf16": (True, "bf16"),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` (2 n^3 FLOPs each) on `device`."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    wait = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up: first call allocates and picks kernels
    wait()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        wait()  # a GPU returns at once: time the work, not the launch
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_token(cfg: ModelConfig) -> float:
    """nanoGPT/PaLM estimate (`bardlm.train.speed.flops_per_token`), on a meta model of `cfg`."""
    from bardlm.nn.model import GPT

    with torch.device("meta"):
        return model_flops_per_token(GPT(cfg))


def shape_config(shape: str, vocab_size: int, **overrides: object) -> ModelConfig:
    """The model of `shape`, with `overrides` (e.g. dropout=0) replacing its own fields."""
    return ModelConfig(vocab_size=vocab_size, bias=False, **{**SHAPES[shape][0], **overrides})


def measure(text: str, tok: CharTokenizer, shape: str, mode: str, steps: int, warmup: int,
            **overrides: object) -> float:
    """Training tokens per second of `steps` steps after `warmup` (compilation happens there)."""
    batch = SHAPES[shape][1]
    compile_, dtype = MODES[mode]
    cfg = shape_config(shape, tok.vocab_size, **overrides)
    tc = TrainConfig(batch_size=batch, max_iters=10**6, compile=compile_, dtype=dtype,
                     optimizer="fused", warmup_iters=10)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, tc, tok, text, out, progress=False, log=lambda m: None)
        for _ in range(warmup):
            trainer.train_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        elapsed = time.perf_counter() - t0
    return steps * batch * cfg.block_size / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--dropout", type=float, default=None,
                    help="replace every shape's dropout rate (e.g. 0 to see what dropout costs)")
    ap.add_argument("--torch-dropout", action="store_true",
                    help="F.dropout's masks instead of the fast ones (fast_dropout=false)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = load_corpus("tiny-shakespeare")[0]
    tok = CharTokenizer.train(text)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for shape in args.shapes:
        overrides = {} if args.dropout is None else {"dropout": args.dropout}
        if args.torch_dropout:
            overrides["fast_dropout"] = False
        cfg = shape_config(shape, tok.vocab_size, **overrides)
        fpt = flops_per_token(cfg)
        results[shape] = {}
        base = None
        for mode in args.modes:
            tok_s = measure(text, tok, shape, mode, args.steps, args.warmup, **overrides)
            base = base or tok_s  # the first mode measured (eager fp32 by default) is the baseline
            mfu = fpt * tok_s / (peak[MODES[mode][1]] * 1e9)
            results[shape][mode] = {"tokens_per_sec": round(tok_s, 1), "mfu": round(mfu, 4),
                                    "speedup": round(tok_s / base, 3)}
            print(f"{shape:>16} {mode:>14}: {tok_s:9,.0f} tokens/s  MFU {mfu:6.1%}  "
                  f"x{tok_s / base:.2f} vs {args.modes[0]}", flush=True)
    print(json.dumps({"peak_gflops": {k: round(v, 1) for k, v in peak.items()}, "results": results}))


if __name__ == "__main__":
    main()
