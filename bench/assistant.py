"""From a pretrained model to an assistant: held-out exact match before and after full
finetuning and LoRA, and LoRA's sensitivity to its learning rate (issue 18's demonstration).

    python bench/assistant.py                         # the docs/benchmarks.md run (~8 min, 1 thread)
    python bench/assistant.py --sweep 1e-3 5e-3 1e-2  # also LoRA at other learning rates (~18 min)
    python bench/assistant.py --qlora int4 int8       # also QLoRA: LoRA over a 4-/8-bit base (issue 28)

Pretrains a char model on tiny Shakespeare, writes the "shout WORD" -> "WORD" task (3,000
training conversations, 100 held-out ones with unseen words), finetunes the whole model and,
separately, rank-8 LoRA adapters on c_attn, c_proj and c_fc (`bardlm.lab.assistant`). Each
`--sweep` value is one more LoRA run from the same base and data, each `--qlora` dtype one more
LoRA run (same rate) over the frozen base quantized to it. Prints a table and one JSON
line. Wall times depend on the machine and its load: say both when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bardlm.lab.assistant import finetune_and_score, run_assistant_demo
from bardlm.train.data import load_corpus
from bardlm.train.sft import read_chat_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/assistant")
    p.add_argument("--pretrain-iters", type=int, default=1000)
    p.add_argument("--iters", type=int, default=1500, help="finetuning steps, full and LoRA")
    p.add_argument("--lr", type=float, default=3e-3, help="full finetuning learning rate")
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--sweep", type=float, nargs="*", default=[], help="more LoRA learning rates")
    p.add_argument("--qlora", nargs="*", default=[], choices=["int8", "int4"],
                   help="also LoRA over the base in these dtypes (QLoRA)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    text, _ = load_corpus("tiny-shakespeare")
    model = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    pre = dict(max_iters=args.pretrain_iters, batch_size=32, lr=3e-3, warmup_iters=20,
               eval_interval=args.pretrain_iters, eval_batches=2)
    full = dict(max_iters=args.iters, batch_size=32, lr=args.lr, min_lr=args.lr / 10, warmup_iters=20,
                eval_interval=args.iters, weight_decay=0.0)
    lora = dict(full, lr=args.lora_lr, min_lr=args.lora_lr / 10)
    out = Path(args.out)
    r = run_assistant_demo(out, text, model, pre, full, lora, lora_rank=args.lora_rank,
                           n_train=3000, n_test=100)
    sweep = []
    test = read_chat_jsonl(out / "test.jsonl")
    for lr in args.sweep:
        one = finetune_and_score(out, f"lora-lr{lr:g}", dict(lora, lr=lr, min_lr=lr / 10), args.lora_rank,
                                 test, log=lambda m: None)
        sweep.append({"lr": lr, "exact_match": one["exact_match"], "val_loss": round(one["val_loss"], 4),
                      "s": round(one["s"], 1)})
    qlora = []
    for dtype in args.qlora:
        one = finetune_and_score(out, f"qlora-{dtype}", lora, args.lora_rank, test, log=lambda m: None,
                                 base_dtype=dtype)
        qlora.append({"base_dtype": dtype, "exact_match": one["exact_match"],
                      "val_loss": round(one["val_loss"], 4), "s": round(one["s"], 1),
                      "vs_lora": round(one["exact_match"] - r["lora"], 3)})
    print(f"\n{'':<28}{'exact match':>12}{'val loss':>10}{'trained':>12}{'wall s':>8}")
    print(f"{'pretrained, before':<28}{r['before']:>12.2f}{'':>10}{'-':>12}{r['pretrain_s']:>8.0f}")
    for name in ("full", "lora"):
        label = f"full, lr {args.lr:g}" if name == "full" else f"LoRA r{args.lora_rank}, lr {args.lora_lr:g}"
        share = f"{r[name + '_trainable'] / r[name + '_total']:.1%}"
        print(f"{label:<28}{r[name]:>12.2f}{r[name + '_val_loss']:>10.4f}{share:>12}{r[name + '_s']:>8.0f}")
    for s in sweep:
        print(f"{'LoRA r' + str(args.lora_rank) + ', lr ' + format(s['lr'], 'g'):<28}"
              f"{s['exact_match']:>12.2f}{s['val_loss']:>10.4f}{'':>12}{s['s']:>8.0f}")
    for q in qlora:
        print(f"{'QLoRA r' + str(args.lora_rank) + ', ' + q['base_dtype'] + ' base':<28}"
              f"{q['exact_match']:>12.2f}{q['val_loss']:>10.4f}{'':>12}{q['s']:>8.0f}")
    print(json.dumps({**r, "lora_lr": args.lora_lr, "full_lr": args.lr, "iters": args.iters,
                      "pretrain_iters": args.pretrain_iters, "threads": args.threads,
                      "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                      "sweep": sweep, "qlora": qlora}))


if __name__ == "__main__":
    main()
