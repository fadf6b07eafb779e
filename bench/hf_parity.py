"""Parity and speed of bardlm against `transformers` on the same random-weight checkpoint.

For each family (GPT-2, Llama, Qwen3) a mid-sized model is built in `transformers` from a config
(no download), saved, loaded with `bardlm.from_pretrained`, and both are timed on the same batch,
alternating runs in one process so machine load affects both alike. Prints the max |logit|
difference and the forward-time ratio bardlm / transformers (below 1: bardlm is faster).

    PYTHONPATH=src python bench/hf_parity.py [--layers 4] [--dim 512] [--seq 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import bardlm


def reference(family: str, layers: int, dim: int, vocab: int) -> torch.nn.Module:
    heads = dim // 64
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=dim,
                                          n_layer=layers, n_head=heads, bos_token_id=0,
                                          eos_token_id=0))
    common = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=3 * dim,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 4), max_position_embeddings=1024)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=128, tie_word_embeddings=True))


def timed(model: torch.nn.Module, idx: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(idx)
    return time.perf_counter() - t0


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.layers} layers, {args.dim} dims, batch {args.batch} x {args.seq} tokens")
    print(f"{'family':<7} {'params':>11} {'max |dlogit|':>13} {'bardlm ms':>10} {'HF ms':>8} {'ratio':>6}")
    for family in ("gpt2", "llama", "qwen3"):
        torch.manual_seed(0)
        ref = reference(family, args.layers, args.dim, args.vocab).eval()
        with tempfile.TemporaryDirectory() as d:
            ref.save_pretrained(d)
            ours = bardlm.from_pretrained(d)
        idx = torch.randint(0, args.vocab, (args.batch, args.seq))
        diff = (ours(idx)[0] - ref(idx).logits).abs().max().item()
        t_ours, t_ref = [], []
        for _ in range(args.repeats):  # alternate so load drifts hit both sides
            t_ours.append(timed(ours, idx))
            t_ref.append(timed(ref, idx))
        a, b = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
        print(f"{family:<7} {ours.num_params():>11,} {diff:>13.2e} {a:>10.1f} {b:>8.1f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
