"""Beyond SFT, measured: GRPO and DPO on two-digit arithmetic (issue 30's demonstration).

    python bench/post_training.py          # the docs/benchmarks.md run

Pretrains a char model on tiny Shakespeare (digits and +/- added to its vocabulary), SFTs it
(Muon) on "a+b" / "a-b" -> value as written by a teacher that forgets most carries, then from
that SFT model runs DPO (chosen: the value; rejected: the value with the carry or borrow
forgotten, or off by 1 or 10 where there is none) and GRPO on the
built-in `arithmetic` task (`--task arithmetic-lsb`: every stage with the answers written least
significant digit first, 57+68 -> 521): `bardlm.lab.post_training`. `--seed` seeds every stage
and draws the questions (report two seeds). Prints the figures and one JSON line; writes
OUT/rl/rl.png (the reward curve) and OUT/post_training.png (DPO's and GRPO's curves). Wall times
depend on the machine and its load: say both when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bardlm.lab.post_training import run_post_training_demo
from bardlm.train.data import load_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/post_training")
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "arithmetic-lsb"),
                   help="the answers' digit order: arithmetic-lsb writes them least significant digit first "
                        "(57+68 -> 521, sign last); measured no faster to learn here (docs/benchmarks.md)")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--teacher-error", type=float, default=0.8,
                   help="share of the carry questions whose SFT answer forgets the carry")
    p.add_argument("--n-sft", type=int, default=8000, help="SFT questions")
    p.add_argument("--n-pairs", type=int, default=8000, help="DPO training pairs (the SFT questions, right answer against a wrong one)")
    p.add_argument("--n-val", type=int, default=200, help="held-out questions (all stages)")
    p.add_argument("--pretrain-iters", type=int, default=60)
    p.add_argument("--sft-iters", type=int, default=3000)
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-optimizer", default="muon", choices=("auto", "muon"),
                   help="SFT's optimizer: AdamW (auto) or Muon for the blocks' matrices")
    p.add_argument("--sft-weight-decay", type=float, default=0.0)
    p.add_argument("--sft-eval-every", type=int, default=0,
                   help="score held-out exact match every N SFT steps (default: at the end only)")
    p.add_argument("--rl-iters", type=int, default=600)
    p.add_argument("--rl-lr", type=float, default=5e-5)
    p.add_argument("--rl-batch", type=int, default=16, help="GRPO prompts a step")
    p.add_argument("--group", type=int, default=8, help="GRPO samples a prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature")
    p.add_argument("--dpo-iters", type=int, default=2500)
    p.add_argument("--dpo-lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.5, help="DPO's beta")
    p.add_argument("--sft-weight", type=float, default=1.0, help="DPO's weight on the chosen answers' NLL")
    p.add_argument("--seed", type=int, default=1337, help="seed of every stage (and of the questions)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=4, help="the char model's layers")
    p.add_argument("--n-embd", type=int, default=128, help="the char model's width (4 heads)")
    p.add_argument("--pos", default="learned", choices=("learned", "rope"), help="the char model's positions")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    text, _ = load_corpus("tiny-shakespeare")
    model = dict(vocab_size=65, block_size=64, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, bias=False,
                 pos=args.pos)
    pre = dict(max_iters=args.pretrain_iters, batch_size=32, lr=3e-3, warmup_iters=20,
               eval_interval=args.pretrain_iters, eval_batches=2, seed=args.seed)
    sft = dict(max_iters=args.sft_iters, batch_size=args.sft_batch, lr=args.sft_lr, min_lr=args.sft_lr / 10,
               warmup_iters=20, eval_interval=args.sft_eval_every or args.sft_iters, weight_decay=args.sft_weight_decay,
               optimizer=args.sft_optimizer, val_fraction=0.02, seed=args.seed)
    dpo = dict(max_iters=args.dpo_iters, batch_size=16, lr=args.dpo_lr, min_lr=args.dpo_lr / 10, warmup_iters=10,
               eval_interval=max(args.dpo_iters // 5, 1), weight_decay=0.0, val_fraction=0.05, seed=args.seed)
    rl = dict(max_iters=args.rl_iters, batch_size=args.rl_batch, lr=args.rl_lr, min_lr=args.rl_lr / 10,
              warmup_iters=10, eval_interval=max(args.rl_iters // 10, 1), weight_decay=0.0, seed=args.seed)
    r = run_post_training_demo(args.out, text, model, pre, sft, dpo, rl, digits=args.digits, n_sft=args.n_sft,
                               n_pairs=args.n_pairs, n_val=args.n_val, beta=args.beta, group=args.group,
                               sft_weight=args.sft_weight, teacher_error=args.teacher_error,
                               temperature=args.temperature, task=args.task)
    print(f"\n{'held-out (' + str(r['n_val']) + ' questions)':<34}{'SFT':>8}{'after':>8}")
    print(f"{'DPO preference accuracy':<34}{r['sft_likelihood_preference']:>8.3f}{r['dpo_pref_accuracy']:>8.3f}")
    print(f"{'DPO exact match':<34}{r['sft_exact_match']:>8.3f}{r['dpo_exact_match']:>8.3f}")
    print(f"{'GRPO exact match (pass@1)':<34}{r['rl_before_pass_at_1']:>8.3f}{r['rl_pass_at_1']:>8.3f}")
    print(f"{'  on carry questions':<34}{r['sft_exact_match_carry']:>8.3f}{r['rl_exact_match_carry']:>8.3f}")
    print(f"{'  on the others':<34}{r['sft_exact_match_no_carry']:>8.3f}{r['rl_exact_match_no_carry']:>8.3f}")
    print(f"wall: pretrain {r['pretrain_s']:.0f} s, SFT {r['sft_s']:.0f} s, DPO {r['dpo_s']:.0f} s, "
          f"GRPO {r['rl_s']:.0f} s; load average at start {load:.1f}, {args.threads} thread(s)")
    print(json.dumps({k: v for k, v in r.items() if k not in ("rl_curve", "sft_curve", "dpo_curve")}))


if __name__ == "__main__":
    main()
