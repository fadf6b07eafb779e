"""After supervised finetuning, measured: preference tuning (DPO) and RL (GRPO) on arithmetic.

The chain: pretrain a char model on text -> SFT it on two-digit "a+b" / "a-b" questions (user)
and their values (assistant) -> from that SFT model (DPO first: it is the shorter stage),
  - DPO on pairs (chosen: the right value; rejected: a plausible wrong one, `wrong_answer`: the
    value with the carry or borrow forgotten where there is one, else off by 1 or 10), with an
    SFT term on the chosen answers (`sft_weight`) so that they stay likely: held-out preference
    accuracy and exact match, before and after;
  - GRPO on the built-in `arithmetic` task (exact-answer reward): held-out exact match (pass@1,
    greedy) before and after, and the reward curve (rl/rl.png); post_training.png draws both
    stages' curves.
Exact match is also reported on the held-out questions with and without a carry (`needs_carry`),
where the mistakes differ.

Two digits, not one: the one-digit task has only 200 questions, so its held-out ones are facts
no stage saw, which neither SFT nor RL can be expected to get right; two-digit held-out
questions share the structure of the training ones. GRPO needs an SFT model that is right on
some of its samples and wrong on others (groups with a spread of rewards: a group whose answers
all score the same has zero advantages and teaches nothing).

`teacher_error` > 0 makes the SFT answers those of a sloppy teacher that forgets the carry (or
the borrow) in that share of the questions that need one (`forgot_carry`: 57+68 -> 115,
52-27 -> 35): the classic set-up for RL with a verifiable reward, an SFT model unsure between the
right answer and a plausible wrong one, which the reward can settle. The SFT model must have
learned the task itself, or RL has nothing to sharpen: with AdamW this 4 x 128 model needed
4,000 steps, with Muon (the demo's default) about 2,000 (docs/benchmarks.md, eighth round).

`task="arithmetic-lsb"` writes every answer of every stage (SFT, DPO's pairs, GRPO's reward,
exact match) least significant digit first, sign last (`format_answer`: 57+68 -> "521"); the
questions are the same.

Every question set comes from `demo_task` (`train.grpo.make_task`, the same seed and pool as
GRPO's own), so the held-out questions of all stages are the same and none is trained on.

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
from ..errors import BardlmError
from ..infer.generate import eval_mode
from ..io.load import load
from ..tokenizers import CharTokenizer
from ..train.dpo import DPOTuner, encode_pairs, read_pref_jsonl
from ..train.grpo import N_TRAIN, GRPOTuner, Task, eval_arithmetic, format_answer, make_task
from ..train.logps import sequence_logps
from ..train.sft import Finetuner, exact_match, pad_rows
from ..train.trainer import Trainer
from .assistant import write_jsonl


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def needs_carry(question: str) -> bool:
    """Does "a+b" carry out of the ones column, or "a-b" (the larger minus the smaller) borrow
    into it?"""
    if "+" in question:
        a, b = (int(x) for x in question.split("+"))
        return a % 10 + b % 10 >= 10
    a, b = (int(x) for x in question.split("-", 1))
    return max(a, b) % 10 < min(a, b) % 10


def forgot_carry(question: str) -> int:
    """The value of `question` as written by someone who forgets the carry or the borrow: a sum
    10 short (57+68 -> 115), a difference 10 too large in size (52-27 -> 35, 27-52 -> -35)."""
    v = eval_arithmetic(question)
    if not needs_carry(question):
        return v
    if "+" in question:
        return v - 10
    return v + 10 if v >= 0 else v - 10


def teacher_answer(question: str, error: float, rng: random.Random, task: str = "arithmetic") -> str:
    """The sloppy teacher's answer, written as `task` writes it (`format_answer`): with
    probability `error`, a question that needs a carry gets the forgot-the-carry value; every
    other answer is right."""
    if needs_carry(question) and rng.random() < error:
        return format_answer(forgot_carry(question), task)
    return format_answer(eval_arithmetic(question), task)


def wrong_answer(question: str, rng: random.Random, task: str = "arithmetic") -> str:
    """A plausible wrong value, written as `task` writes it: the forgot-the-carry one where there
    is a carry, else off by one in the last digit or the one before."""
    if needs_carry(question):
        return format_answer(forgot_carry(question), task)
    return format_answer(eval_arithmetic(question) + rng.choice((-10, -1, 1, 10)), task)


def preference_rows(questions: list[str], seed: int, task: str = "arithmetic") -> list[dict[str, Any]]:
    """DPO pairs of `questions`: chosen the right answer, rejected `wrong_answer`."""
    rng = random.Random(seed)
    rows = []
    for q in questions:
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": format_answer(eval_arithmetic(q), task)}],
                     "rejected": [{"role": "assistant", "content": wrong_answer(q, rng, task)}]})
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


def split_exact_match(model: torch.nn.Module, tokenizer: Any, template: Any, questions: list[str],
                      task: str = "arithmetic") -> dict[str, float]:
    """Held-out exact match (greedy; answers written as `task` writes them), overall and on the
    questions with and without a carry."""
    hits, counts = {}, {}
    for part, qs in (("carry", [q for q in questions if needs_carry(q)]),
                     ("no_carry", [q for q in questions if not needs_carry(q)])):
        counts[part] = len(qs)
        convs = [conversation(q, format_answer(eval_arithmetic(q), task)) for q in qs]
        hits[part] = exact_match(model, tokenizer, template, convs) * len(qs) if qs else 0.0
    return {"all": sum(hits.values()) / len(questions),
            **{part: hits[part] / counts[part] if counts[part] else float("nan") for part in hits}}


class ScoredFinetuner(Finetuner):
    """SFT that also scores held-out exact match (overall, carry, other) at every evaluation:
    learning arithmetic goes through a slow, noisy transition that the loss alone hides."""

    def __init__(self, *args: Any, questions: list[str], task: str = "arithmetic", **kwargs: Any) -> None:
        self.questions, self.task = questions, task
        super().__init__(*args, **kwargs)

    def eval_metrics(self) -> dict[str, float]:
        with eval_mode(self.model):
            em = split_exact_match(self.model, self.tokenizer, self.template, self.questions, self.task)
        return {**super().eval_metrics(), **{f"exact_match_{k}": v for k, v in em.items()}}

    def describe(self, row: dict[str, Any]) -> str:
        return (f"{super().describe(row)}; held-out exact match {row['exact_match_all']:.3f} "
                f"(carry {row['exact_match_carry']:.3f}, no carry {row['exact_match_no_carry']:.3f})")


def demo_task(digits: int, n_sft: int, n_pairs: int, n_val: int, seed: int, task: str = "arithmetic") -> Task:
    """The demo's questions: `val` are GRPO's held-out ones (`GRPOTuner` draws its task with
    `make_task`'s default pool, `N_TRAIN` training prompts), held out by every stage; SFT and DPO
    draw from `train`. make_task caps the held-out share at a fifth of its pool, so the pool is
    never smaller than GRPO's: a smaller one (few SFT questions, many held-out) would hold out
    fewer questions than GRPO and train SFT on some of GRPO's held-out ones."""
    return make_task(task, digits, n_train=max(n_sft, n_pairs, N_TRAIN), n_val=n_val, seed=seed)


def run_post_training_demo(out: str | Path, text: str, model: dict[str, Any], pretrain: dict[str, Any],
                           sft: dict[str, Any], dpo: dict[str, Any], rl: dict[str, Any], digits: int = 2,
                           n_sft: int = 2000, n_pairs: int = 1000, n_val: int = 200, beta: float = 0.1,
                           group: int = 8, sft_weight: float = 1.0, teacher_error: float = 0.0,
                           temperature: float = 1.0, task: str = "arithmetic",
                           log: Any = print) -> dict[str, Any]:
    """Pretrain on `text`, SFT on the answers of a teacher that forgets a share `teacher_error`
    of the carries, then DPO and GRPO from the SFT model. pretrain/sft/dpo/rl: TrainConfig
    fields of each stage (rl's seed fixes the questions); `task`: `arithmetic` or
    `arithmetic-lsb` (the answers' digit order, in every stage). Returns the figures."""
    if task not in ("arithmetic", "arithmetic-lsb"):
        raise BardlmError(f"--task {task!r}: the demo is arithmetic or arithmetic-lsb")
    name = task
    seed = rl.get("seed", TrainConfig().seed)
    task = demo_task(digits, n_sft, n_pairs, n_val, seed, name)
    grpo_val = make_task(name, digits, seed=seed, n_val=n_val).val  # as GRPOTuner draws them
    if task.val != grpo_val:  # before any training: every stage must score the same questions
        raise BardlmError(f"--n-val {n_val}: GRPO can hold out only {len(grpo_val)} of its {digits}-digit "
                          f"questions (a fifth of its pool); use --n-val {len(grpo_val)} or fewer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    tok = CharTokenizer.train(text + "0123456789+-")
    Trainer(ModelConfig(**model), TrainConfig(**pretrain), tok, text, out / "pretrained",
            progress=False, log=log).fit()
    times["pretrain_s"] = time.time() - t0

    rng = random.Random(0)
    write_jsonl([{"messages": conversation(q, teacher_answer(q, teacher_error, rng, name))}
                 for q in task.train[:n_sft]], out / "sft.jsonl")
    write_jsonl(preference_rows(task.train[:n_pairs], 1, name), out / "prefs.jsonl")  # SFT's questions too
    write_jsonl(preference_rows(task.val, 2, name), out / "prefs_val.jsonl")

    t0 = time.time()
    ft = ScoredFinetuner(out / "pretrained", out / "sft.jsonl", out / "sft", TrainConfig(**sft), log=log,
                         questions=task.val, task=name)
    ft.fit()
    times["sft_s"] = time.time() - t0
    sft_model, sft_tok = load(out / "sft")
    sft_pairs = pair_logps(sft_model, sft_tok, ft.template, out / "prefs_val.jsonl")
    em = split_exact_match(sft_model, sft_tok, ft.template, task.val, name)
    r: dict[str, Any] = {"sft_exact_match": em["all"], "sft_exact_match_carry": em["carry"],
                         "sft_exact_match_no_carry": em["no_carry"],
                         "sft_likelihood_preference": preference_accuracy(sft_pairs)}
    r["sft_curve"] = [{k: round(row[k], 4) for k in ("step", "val_loss", "exact_match_all")} for row in ft.history]
    log(f"SFT: held-out exact match {em['all']:.3f} (carry {em['carry']:.3f}, no carry {em['no_carry']:.3f})")

    t0 = time.time()
    d = DPOTuner(out / "sft", out / "prefs.jsonl", out / "dpo", TrainConfig(**dpo), log=log, beta=beta,
                 sft_weight=sft_weight)
    d.fit()
    times["dpo_s"] = time.time() - t0
    d.model.eval()
    # On the held-out questions (never trained on by any stage): DPO's reward accuracy against
    # the SFT model, and what the model itself finds likelier.
    dpo_pairs = pair_logps(d.model, d.tokenizer, d.template, out / "prefs_val.jsonl")
    em = split_exact_match(d.model, d.tokenizer, d.template, task.val, name)
    r.update(dpo_pref_accuracy=preference_accuracy(dpo_pairs, sft_pairs),
             dpo_split_pref_accuracy=d.history[-1]["pref_accuracy"], dpo_margin=d.history[-1]["margin"],
             dpo_likelihood_preference=preference_accuracy(dpo_pairs), dpo_exact_match=em["all"],
             dpo_exact_match_carry=em["carry"], dpo_exact_match_no_carry=em["no_carry"],
             dpo_curve=[{k: round(row[k], 4) for k in ("step", "pref_accuracy", "margin", "reward_chosen",
                                                        "reward_rejected")} for row in d.history])
    log(f"DPO: preference accuracy {r['dpo_pref_accuracy']:.3f}, exact match {r['dpo_exact_match']:.3f}")

    t0 = time.time()
    g = GRPOTuner(out / "sft", name, out / "rl", TrainConfig(**rl), log=log, digits=digits,
                  group=group, temperature=temperature, max_new_tokens=len(str(10 ** digits * 2)) + 3,
                  n_val=n_val)
    r["rl_before_pass_at_1"] = g.pass_at_1()
    g.fit()
    times["rl_s"] = time.time() - t0
    g.model.eval()
    em = split_exact_match(g.model, g.tokenizer, g.template, task.val, name)
    r.update(rl_pass_at_1=g.history[-1]["pass_at_1"], rl_exact_match_carry=em["carry"],
             rl_exact_match_no_carry=em["no_carry"],
             rl_curve=[{k: round(row[k], 4) for k in ("step", "reward", "spread", "pass_at_1", "kl", "completion_len")}
                       for row in g.history])
    log(f"GRPO: held-out exact match {r['rl_before_pass_at_1']:.3f} -> {r['rl_pass_at_1']:.3f} "
        f"(carry {em['carry']:.3f}, no carry {em['no_carry']:.3f})")

    r.update({k: round(v, 1) for k, v in times.items()}, digits=digits, n_sft=len(task.train[:n_sft]),
             n_pairs=len(task.train[:n_pairs]),
             n_val=len(task.val), teacher_error=teacher_error, task=name)
    (out / "post_training.json").write_text(json.dumps(r, indent=2))
    plot_post_training(r, out / "post_training.png")
    return r


def plot_post_training(r: dict[str, Any], path: Path) -> None:
    """post_training.png: DPO's preference accuracy and reward margin on its held-out pairs
    (left), GRPO's mean training reward and held-out pass@1 (right, dotted: the SFT model's
    held-out exact match, where GRPO starts), against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    dpo, rl = r["dpo_curve"], r["rl_curve"]
    a.plot([c["step"] for c in dpo], [c["pref_accuracy"] for c in dpo], "o-", label="preference accuracy (held-out pairs)")
    a.set_ylim(0.4, 1.02)
    a.set_xlabel("DPO step")
    a.set_ylabel("accuracy")
    m = a.twinx()
    m.plot([c["step"] for c in dpo], [c["margin"] for c in dpo], "s--", color="tab:orange", label="reward margin")
    m.set_ylabel("margin (beta x log-ratio)")
    a.legend(handles=a.get_lines() + m.get_lines(), loc="lower right")
    a.set_title(f"DPO: exact match {r['sft_exact_match']:.3f} -> {r['dpo_exact_match']:.3f}")
    b.plot([c["step"] for c in rl], [c["reward"] for c in rl], label="mean reward (training samples)")
    b.plot([c["step"] for c in rl], [c["pass_at_1"] for c in rl], label="pass@1 (held-out, greedy)")
    b.axhline(r["rl_before_pass_at_1"], ls=":", color="grey", label="the SFT model")
    b.set_ylim(-0.02, 1.02)
    b.set_xlabel("GRPO step")
    b.legend(loc="lower right")
    b.set_title(f"GRPO: exact match {r['rl_before_pass_at_1']:.3f} -> {r['rl_pass_at_1']:.3f}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
