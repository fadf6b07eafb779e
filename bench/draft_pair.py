"""Train a target model and a draft model for speculative decoding on the complete works.

    python bench/draft_pair.py --out runs/pair            # 40-50 minutes on 2 cores
    python bench/decode.py --draft-pair runs/pair/target runs/pair/draft

1. The target: 8 layers x 512 (GPT-2's block) with a 2,048-token byte-level BPE trained on the
   corpus (26M parameters, 105 MB in fp32: a decode step reads three times what a 32 MiB L3
   holds, so it is bound by reading weights, like a real model's), trained with bf16 autocast
   and torch.compile (`--set dtype=bf16 --set compile=true`) for `--target-iters` steps of
   8 x 256 tokens: long enough to write ordinary text (the pair's figure is only meaningful on
   a target that writes prose, not commas and newlines). `--target-layers`, `--target-width`
   and `--no-compile` (eager fp32) make the toy pair the suite trains (tests/test_bench.py).
2. Its greedy continuations of passages of the corpus's training split (the text the draft must
   predict when the target decodes greedily), decoded in batches.
3. The draft: 2 layers x 256 with the target's tokenizer, trained on those continuations (a draft
   distilled from the target's own greedy outputs).

Both are trained by `bardlm train` (the one training loop). Writes OUT/pair.json (the corpus,
which `bench/decode.py --draft-pair` reads to time on its held-out last 1%) and ends with one
JSON line: the directories, sizes, the target's validation loss and the draft's agreement with
the target (the fraction of the target's greedy tokens the draft predicts, teacher-forced, on
held-out continuations).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bardlm import cli, load
from bardlm.infer.generate import generate_batch
from bardlm.train.data import load_corpus

CORPUS = "shakespeare"  # the complete works (5.3 MB); tiny-shakespeare is 1.1 MB


def train(args: list[str]) -> None:
    """`bardlm train` in this process; stop on failure."""
    if cli.main(["train", "--no-progress", "--overwrite", *args]) != 0:
        raise SystemExit(f"bardlm train {' '.join(args)} failed")


def continuations(model: torch.nn.Module, prompts: list[list[int]], new: int, batch: int) -> list[list[int]]:
    """The target's greedy continuation (`new` ids) of each prompt, `batch` prompts per pass."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        out += generate_batch(model, prompts[i:i + batch], new, temperature=0)
    return out


@torch.no_grad()
def agreement(target_ids: list[list[int]], prompts: list[list[int]], draft: torch.nn.Module) -> float:
    """The fraction of the target's greedy tokens the draft's argmax predicts (teacher-forced)."""
    hits = total = 0
    for p, c in zip(prompts, target_ids):
        seq = torch.tensor([p + c])
        pred = draft(seq[:, :-1])[0][0, len(p) - 1:].argmax(-1)
        hits += int((pred == seq[0, len(p):]).sum())
        total += len(c)
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pair")
    ap.add_argument("--data", default=CORPUS)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--target-iters", type=int, default=1500)
    ap.add_argument("--target-batch", type=int, default=8)
    ap.add_argument("--draft-iters", type=int, default=400)
    ap.add_argument("--prompts", type=int, default=768, help="passages the target continues")
    ap.add_argument("--new", type=int, default=128, help="tokens per continuation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-layers", type=int, default=8)
    ap.add_argument("--target-width", type=int, default=512, help="the target's n_embd (8 heads)")
    ap.add_argument("--no-compile", action="store_true",
                    help="train the target eager, in fp32 (the suite's smoke run: compiling takes a minute)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    common = ["--set", "block_size=256", "--set", "warmup_iters=10", "--set", "eval_batches=2",
              "--set", "dropout=0"]
    train(["--preset", "gpt2-124m", "--data", args.data, "--tokenizer", f"bpe:{args.vocab}",
           "--out", str(out / "target"), "--max-iters", str(args.target_iters), *common,
           "--set", f"n_layer={args.target_layers}", "--set", f"n_embd={args.target_width}", "--set", "n_head=8",
           "--set", f"batch_size={args.target_batch}", "--set", "lr=1e-3", "--set", "min_lr=1e-4",
           "--set", "warmup_iters=100", "--set", "val_fraction=0.01",
           *([] if args.no_compile else ["--set", "dtype=bf16", "--set", "compile=true"]),
           "--set", f"eval_interval={min(100, args.target_iters)}"])
    t_target = time.perf_counter() - t0

    target, tok = load(out / "target", "fp32")
    text, _ = load_corpus(args.data)
    ids = tok.encode(text[: len(text) * 98 // 100])  # the training split (the benchmark's prompts are not)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - 32, (args.prompts,), generator=g).tolist()
    prompts = [ids[s:s + 32] for s in starts]
    t1 = time.perf_counter()
    conts = continuations(target, prompts, args.new, 64)
    t_gen = time.perf_counter() - t1
    held = max(1, args.prompts // 8)  # the last eighth checks the draft's agreement
    samples = out / "target_greedy.txt"
    samples.write_text("\n\n".join(tok.decode(p + c) for p, c in zip(prompts[:-held], conts[:-held])))

    t2 = time.perf_counter()
    train(["--preset", "gpt2-124m", "--data", str(samples), "--tokenizer", str(out / "target" / "tokenizer.json"),
           "--out", str(out / "draft"), "--max-iters", str(args.draft_iters), *common,
           "--set", "n_layer=2", "--set", "n_embd=256", "--set", "n_head=4", "--set", "batch_size=8",
           "--set", "lr=3e-3", "--set", "min_lr=3e-4", "--set", f"eval_interval={args.draft_iters}"])
    t_draft = time.perf_counter() - t2
    draft, _ = load(out / "draft", "fp32")
    (out / "pair.json").write_text(json.dumps({"data": args.data}))
    final = json.loads((out / "target" / "metrics.jsonl").read_text().splitlines()[-1])  # the whole split's
    target_val = final.get("val_loss_full", final.get("val_loss"))
    summary = dict(
        target=str(out / "target"), draft=str(out / "draft"),
        target_params=target.num_params(), draft_params=draft.num_params(), target_val_loss=round(target_val, 3),
        draft_agreement=round(agreement(conts[-held:], prompts[-held:], draft), 3),
        seconds=dict(target=round(t_target), generate=round(t_gen), draft=round(t_draft)),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
