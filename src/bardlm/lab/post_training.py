"""After supervised finetuning, measured: preference tuning (DPO) and RL (GRPO) on arithmetic.

The chain: pretrain a char model on text -> SFT it on "a+b" / "a-b" questions (user) and their
values (assistant) -> from that SFT model,
  - DPO on pairs (chosen: the right value; rejected: a plausible wrong one, off by 1 or 10),
    with an SFT term on the chosen answers (`sft_weight`) so that they stay likely: held-out
    preference accuracy and exact match, before and after;
  - GRPO on the built-in `arithmetic` task: held-out exact match (pass@1, greedy) before and
    after, and the reward curve (rl/rl.png).
SFT is kept short on purpose: a model that already answers everything leaves RL nothing to do.
Every question set comes from `train.grpo.make_task` with the same seed, so the held-out
questions of all stages are the same and none is trained on.

`run_post_training_demo` runs it all; bench/post_training.py is the docs/benchmarks.md run.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, TrainConfig
from ..io.load import load
from ..tokenizers import CharTokenizer
from ..train.dpo import DPOTuner, encode_pairs, read_pref_jsonl
from ..train.grpo import GRPOTuner, eval_arithmetic, make_task
from ..train.logps import sequence_logps
from ..train.sft import Finetuner, exact_match, pad_rows
from ..train.trainer import Trainer
from .assistant import write_jsonl


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def wrong_answer(value: int, rng: random.Random) -> str:
    """A plausible wrong value: off by one in the last digit or the one before."""
    return str(value + rng.choice((-10, -1, 1, 10)))


def preference_rows(questions: list[str], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for q in questions:
        v = eval_arithmetic(q)
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": str(v)}],
                     "rejected": [{"role": "assistant", "content": wrong_answer(v, rng)}]})
    return rows


@torch.no_grad()
def pair_logps(model: torch.nn.Module, tokenizer: Any, template: Any, path: Path) -> torch.Tensor:
    """Summed log-probabilities (N, 2) of the chosen and rejected completions of the pairs in
    `path`, under `model` (eval mode)."""
    pairs, _ = encode_pairs(read_pref_jsonl(path), template, tokenizer, model.config.block_size)
    model.eval()
    x, y = pad_rows([c for c, _ in pairs] + [r for _, r in pairs])
    logp, _ = sequence_logps(model, x, y)
    return torch.stack(logp.chunk(2), dim=1)


def preference_accuracy(logp: torch.Tensor, ref: torch.Tensor | None = None) -> float:
    """Share of pairs preferred right: by likelihood (chosen likelier), or with a reference by
    DPO's implicit reward (chosen's log-ratio to the reference higher)."""
    d = logp if ref is None else logp - ref
    return (d[:, 0] > d[:, 1]).float().mean().item()


def run_post_training_demo(out: str | Path, text: str, model: dict[str, Any], pretrain: dict[str, Any],
                           sft: dict[str, Any], dpo: dict[str, Any], rl: dict[str, Any], digits: int = 2,
                           n_sft: int = 2000, n_pairs: int = 1000, n_val: int = 200, beta: float = 0.1,
                           group: int = 8, sft_weight: float = 1.0, log: Any = print) -> dict[str, Any]:
    """Pretrain on `text`, SFT, then DPO and GRPO from the SFT model. pretrain/sft/dpo/rl:
    TrainConfig fields of each stage (rl's seed fixes the questions). Returns the figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    tok = CharTokenizer.train(text + "0123456789+-")
    Trainer(ModelConfig(**model), TrainConfig(**pretrain), tok, text, out / "pretrained",
            progress=False, log=log).fit()
    times["pretrain_s"] = time.time() - t0

    seed = rl.get("seed", TrainConfig().seed)
    task = make_task("arithmetic", digits, n_train=max(n_sft, n_pairs), n_val=n_val, seed=seed)
    answer = lambda q: str(eval_arithmetic(q))  # noqa: E731
    write_jsonl([{"messages": conversation(q, answer(q))} for q in task.train[:n_sft]], out / "sft.jsonl")
    write_jsonl(preference_rows(task.train[:n_pairs], 1), out / "prefs.jsonl")  # SFT's questions too
    write_jsonl(preference_rows(task.val, 2), out / "prefs_val.jsonl")
    val_convs = [conversation(q, answer(q)) for q in task.val]

    t0 = time.time()
    ft = Finetuner(out / "pretrained", out / "sft.jsonl", out / "sft", TrainConfig(**sft), log=log)
    ft.fit()
    times["sft_s"] = time.time() - t0
    sft_model, sft_tok = load(out / "sft")
    sft_pairs = pair_logps(sft_model, sft_tok, ft.template, out / "prefs_val.jsonl")
    r: dict[str, Any] = {"sft_exact_match": exact_match(sft_model, sft_tok, ft.template, val_convs),
                         "sft_likelihood_preference": preference_accuracy(sft_pairs)}
    log(f"SFT: held-out exact match {r['sft_exact_match']:.3f}")

    t0 = time.time()
    d = DPOTuner(out / "sft", out / "prefs.jsonl", out / "dpo", TrainConfig(**dpo), log=log, beta=beta,
                 sft_weight=sft_weight)
    d.fit()
    times["dpo_s"] = time.time() - t0
    d.model.eval()
    # On the held-out questions (never trained on by any stage): DPO's reward accuracy against
    # the SFT model, and what the model itself finds likelier.
    dpo_pairs = pair_logps(d.model, d.tokenizer, d.template, out / "prefs_val.jsonl")
    r.update(dpo_pref_accuracy=preference_accuracy(dpo_pairs, sft_pairs),
             dpo_split_pref_accuracy=d.history[-1]["pref_accuracy"], dpo_margin=d.history[-1]["margin"],
             dpo_likelihood_preference=preference_accuracy(dpo_pairs),
             dpo_exact_match=exact_match(d.model, d.tokenizer, d.template, val_convs))
    log(f"DPO: preference accuracy {r['dpo_pref_accuracy']:.3f}, exact match {r['dpo_exact_match']:.3f}")

    t0 = time.time()
    g = GRPOTuner(out / "sft", "arithmetic", out / "rl", TrainConfig(**rl), log=log, digits=digits,
                  group=group, max_new_tokens=len(str(10 ** digits * 2)) + 3, n_val=n_val)
    r["rl_before_pass_at_1"] = g.pass_at_1()
    g.fit()
    times["rl_s"] = time.time() - t0
    r.update(rl_pass_at_1=g.history[-1]["pass_at_1"],
             rl_curve=[{k: round(row[k], 4) for k in ("step", "reward", "pass_at_1", "kl", "completion_len")}
                       for row in g.history])
    log(f"GRPO: held-out exact match {r['rl_before_pass_at_1']:.3f} -> {r['rl_pass_at_1']:.3f}")
    r.update({k: round(v, 1) for k, v in times.items()}, digits=digits, n_sft=n_sft, n_pairs=n_pairs,
             n_val=len(task.val))
    (out / "post_training.json").write_text(json.dumps(r, indent=2))
    return r
