"""Reinforcement learning with verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath).

One step, for each of `batch_size` prompts:

    sample a group of G completions (the batched generation engine, `infer.generate`)
    --> reward r_i = task(prompt, completion_i) --> advantage A_i = (r_i - mean_g r) / (std_g r + 1e-4)
    --> loss = mean over completions of the mean over its tokens of
              -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i) + kl_coef * KL_t

with ratio_t = pi(y_t) / pi_old(y_t) (pi_old: the policy that sampled; one update per batch, as
TRL's default, so the ratio is 1 in value and only its gradient, A_i * grad log pi, acts) and
KL_t = exp(ref - logp) - (ref - logp) - 1, an unbiased estimate of KL(pi || pi_ref) against the
starting model (with LoRA: the base with adapters off; else a frozen copy, only when kl_coef > 0).
This is TRL's `GRPOTrainer` loss ("grpo" loss type), term for term.

Tasks are verifiable: a built-in (`arithmetic`: add or subtract two numbers of `digits` digits;
`arithmetic-lsb`: the same questions, the answer written least significant digit first, sign
last, 57+68 -> "521", 27-52 -> "52-", `format_answer`; `reverse` / `sort` a word of `digits`
letters: reward 1 for the exact answer, else 0) or
`module.py:function` taking (prompt, completion) and returning a float, with prompts from a
JSONL file. Prompts are user messages in the model's chat template, as `finetune` trains them.
Logged: mean reward and completion length of the training samples, the share of groups whose
rewards are not all equal (the others have zero advantages), the KL, and pass@1 on held-out
prompts (greedy answer with reward >= 1). Sampling is seeded by (seed, step), so a resumed run
draws the same completions as an uninterrupted one.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BardlmError
from ..infer.chat import prompt_ids
from ..infer.generate import eval_mode, generate_batch
from ..nn.lora import adapters_off, lora_layers
from .logps import token_logps
from .sft import ChatBatches, Finetuner, pad_rows, split_conversations, target_row

BUILTIN = ("arithmetic", "arithmetic-lsb", "reverse", "sort")
LETTERS = "abcdefgh"
RL_PLOT = "rl.png"
N_TRAIN = 5000  # a built-in task's training prompts (make_task's pool, beside the held-out ones)


# Tasks --------------------------------------------------------------------------------------
def format_answer(value: int, task: str = "arithmetic") -> str:
    """An arithmetic value as the task writes it: `arithmetic` most significant digit first
    (-25); `arithmetic-lsb` least significant first with the sign last ("52-"), the order in
    which the digits are computed, so that a carry flows with the output instead of having to be
    resolved before its first character (Lee et al., 2023, "Teaching arithmetic to small
    transformers")."""
    if task == "arithmetic-lsb":
        return str(abs(value))[::-1] + ("-" if value < 0 else "")
    return str(value)


def builtin_question(task: str, digits: int, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of a built-in task; both arithmetic tasks draw the same questions."""
    if task.startswith("arithmetic"):
        a, b = (rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits) for _ in range(2))
        q = f"{a}+{b}" if rng.random() < 0.5 else f"{a}-{b}"
        return q, format_answer(eval_arithmetic(q), task)
    word = "".join(rng.choice(LETTERS) for _ in range(digits))
    return f"{task} {word}", word[::-1] if task == "reverse" else "".join(sorted(word))


def builtin_prompts(task: str, digits: int, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to n distinct (question, answer) pairs (fewer when the task has fewer)."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(4 * n):
        q, a = builtin_question(task, digits, rng)
        if q not in seen:
            seen.add(q)
            out.append((q, a))
            if len(out) == n:
                break
    return out


def builtin_reward(task: str) -> Callable[[str, str], float]:
    """The exact-answer reward of a built-in task: 1.0 when the completion is the answer."""
    def reward(prompt: str, completion: str) -> float:
        if task.startswith("arithmetic"):
            answer = format_answer(eval_arithmetic(prompt), task)
        else:
            word = prompt.split(" ", 1)[1]
            answer = word[::-1] if task == "reverse" else "".join(sorted(word))
        return float(completion.strip() == answer)

    return reward


def eval_arithmetic(question: str) -> int:
    """The value of "a+b" or "a-b" (the built-in questions; no eval of arbitrary text)."""
    if "+" in question:
        a, b = question.split("+")
        return int(a) + int(b)
    a, b = question.split("-", 1)
    return int(a) - int(b)


def load_reward(spec: str) -> Callable[[str, str], float]:
    """`path/to/module.py:function` -> the function (prompt, completion) -> float."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise BardlmError(f"--task {spec!r}: use one of {', '.join(BUILTIN)} or module.py:function")
    if not Path(path).is_file():
        raise BardlmError(f"--task {spec}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: any failure is one line
        raise BardlmError(f"--task {spec}: importing {path} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise BardlmError(f"--task {spec}: {path} has no function {name!r}")
    return fn


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a JSONL file, one {"prompt": "..."} a line."""
    path = Path(path)
    if not path.is_file():
        raise BardlmError(f"--prompts {path} does not exist; pass a JSONL file of {{\"prompt\": ...}} lines")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BardlmError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise BardlmError(f'{path}:{n}: expected {{"prompt": "..."}} with a non-empty string')
        out.append(row["prompt"])
    return out


@dataclass
class Task:
    """Training and held-out prompts with the reward that scores a completion of one."""

    name: str
    train: list[str]
    val: list[str]
    reward: Callable[[str, str], float]

    def score(self, prompt: str, completion: str) -> float:
        """The reward as a finite float; a failing reward function is a one-line error."""
        try:
            r = self.reward(prompt, completion)
            r = float(r)
        except Exception as e:  # noqa: BLE001 - the user's function: any failure is one line
            raise BardlmError(f"the reward function of --task {self.name} failed on prompt {prompt!r}, "
                              f"completion {completion!r} ({type(e).__name__}: {e}); fix it and "
                              "--resume: the last checkpoint is kept") from None
        if not math.isfinite(r):
            raise BardlmError(f"the reward function of --task {self.name} returned {r} on prompt {prompt!r}; "
                              "it must return a finite float (fix it and --resume: the last checkpoint is kept)")
        return r


def make_task(name: str, digits: int = 2, prompts: str | Path | None = None, n_train: int = N_TRAIN,
              n_val: int = 100, seed: int = 0, val_fraction: float = 0.1) -> Task:
    """A built-in task (its own prompts, drawn once and split) or a reward function with
    prompts from a file (a `val_fraction` held out)."""
    if name in BUILTIN:
        if prompts is not None:
            raise BardlmError(f"--task {name} makes its own prompts; drop --prompts")
        if not 1 <= digits <= 9:
            raise BardlmError(f"--digits must be 1 to 9, got {digits}")
        pool = [q for q, _ in builtin_prompts(name, digits, n_train + n_val, seed)]
        if len(pool) < 2:
            raise BardlmError(f"--task {name} with --digits {digits} has too few distinct prompts")
        n_v = min(n_val, len(pool) // 5 or 1)
        return Task(name, pool[n_v:], pool[:n_v], builtin_reward(name))
    reward = load_reward(name)
    if prompts is None:
        raise BardlmError(f"--task {name} needs --prompts FILE (JSONL, one {{\"prompt\": ...}} a line)")
    train, val = split_conversations(read_prompts(prompts), val_fraction, seed)
    return Task(name, train, val, reward)


# The objective ------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): normalised within each prompt's group."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def spread_share(rewards: torch.Tensor) -> float:
    """Share of groups (rows of rewards (P, G)) whose rewards are not all equal: the only groups
    with nonzero advantages, so the only ones that teach anything."""
    return (rewards.amax(1) > rewards.amin(1)).float().mean().item()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None, kl_coef: float = 0.0,
              ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean KL per completion token) of the clipped GRPO objective.

    logp, old_logp, ref_logp, mask: (N, L) per completion token; adv (N,)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    per_token = -torch.min(ratio * adv[:, None], clipped * adv[:, None])
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return loss, (kl * mask).sum() / mask.sum().clamp(min=1)


# The run ------------------------------------------------------------------------------------
class GRPOTuner(Finetuner):
    """A GRPO run: a (finetuned) model + a task -> `out` (a checkpoint, or a LoRA adapter).
    `batch_size` prompts a micro-batch, each sampled `group` times."""

    token_weighted = False  # the loss is a mean over sequences already

    def __init__(self, init_from: str | Path, task: str, out: str | Path, cfg: Any, *args: Any,
                 prompts: str | Path | None = None, digits: int = 2, group: int = 8,
                 temperature: float = 1.0, max_new_tokens: int = 16, kl_coef: float = 0.0,
                 epsilon: float = 0.2, n_val: int = 100, **kwargs: Any) -> None:
        if group < 2:
            raise BardlmError(f"--group must be at least 2 (advantages compare a group), got {group}")
        if not temperature > 0:
            raise BardlmError(f"--temperature must be positive for sampling, got {temperature}")
        if kl_coef < 0 or not 0 <= epsilon < 1 or max_new_tokens < 1:
            raise BardlmError("--kl must be >= 0, --epsilon in [0, 1) and --max-new-tokens >= 1")
        self.settings = {"task": task, "prompts": None if prompts is None else str(prompts), "digits": digits,
                         "group": group, "temperature": temperature, "max_new_tokens": max_new_tokens,
                         "kl": kl_coef, "epsilon": epsilon, "n_val": n_val}
        self.task = make_task(task, digits, prompts, seed=cfg.seed, n_val=n_val, val_fraction=cfg.val_fraction)
        self.stats: list[dict[str, float]] = []  # per micro-batch, since the last evaluation
        super().__init__(init_from, task, out, cfg, *args, **kwargs)

    def load_data(self) -> None:
        self.batches = ChatBatches(self.task.train, self.cfg.seed, collate=list)
        self.n_train, self.n_val = len(self.task.train), len(self.task.val)
        self.stop = self.template.stop_ids(self.tokenizer)

    def prepare(self) -> None:
        """A frozen reference for the KL term: with LoRA the base (adapters off), else a copy."""
        self.ref_model = None
        if self.settings["kl"] > 0 and not lora_layers(self.model):
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _ref_logps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(self.model):
            if self.ref_model is not None:
                return token_logps(self.ref_model, x, y)
            with adapters_off(self.model):
                return token_logps(self.model, x, y)

    def _prompt(self, question: str) -> list[int]:
        return prompt_ids(self.template, self.tokenizer, [{"role": "user", "content": question}])

    def complete(self, questions: list[str], temperature: float, seed: int | None) -> list[tuple[list[int], str]]:
        """(completion ids, answer text) of each question: ids end with the end-of-turn marker
        when the model wrote it (so that stopping is learned too); the text is cut before it."""
        s = self.settings
        outs = generate_batch(self.model, [self._prompt(q) for q in questions], s["max_new_tokens"],
                              temperature=temperature, seed=seed, eos_ids=self.stop)
        end = self.template.end
        result = []
        for ids in outs:
            if self.stop and len(ids) < s["max_new_tokens"]:
                ids = [*ids, self.stop[0]]
            elif not self.stop:  # a multi-token end marker: keep ids up to where it is written
                k = next((k for k in range(1, len(ids) + 1) if end in self.tokenizer.decode(ids[:k])), len(ids))
                ids = ids[:k]
            result.append((ids, self.tokenizer.decode(ids).split(end)[0]))
        return result

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """Sample and score one micro-batch of groups: x, y (N, L), ref log-probs (N, L),
        advantages (N,), N = batch_size * group."""
        s, cfg = self.settings, self.cfg
        d = self.dist
        questions = self.batches.batch(step, micro, cfg.batch_size, cfg.grad_accum, d.rank, d.world)
        group = [q for q in questions for _ in range(s["group"])]
        seed = (cfg.seed * 1_000_003 + (step * cfg.grad_accum + micro) * d.world + d.rank) * 4099
        done = self.complete(group, s["temperature"], seed)
        rewards = torch.tensor([self.task.score(q, text) for q, (_, text) in zip(group, done)])
        adv = group_advantages(rewards.view(-1, s["group"])).view(-1)
        rows = []
        for q, (ids, _) in zip(group, done):
            p = self._prompt(q)
            row, _ = target_row(p + ids, [False] * len(p) + [True] * len(ids), self.model.config.block_size)
            if row is None:
                raise BardlmError(f"the prompt {q!r} fills the context ({self.model.config.block_size} "
                                  "tokens): no room for a completion; use shorter prompts")
            rows.append(row)
        x, y = pad_rows(rows)
        self._tokens += x.numel()
        ref = self._ref_logps(x.to(self.device), y.to(self.device)).cpu() if s["kl"] > 0 else torch.zeros(x.shape)
        self.stats.append({"reward": rewards.mean().item(), "spread": spread_share(rewards.view(-1, s["group"])),
                           "completion_len": sum(len(ids) for ids, _ in done) / len(done)})
        return x, y, ref, adv

    def step_loss(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor,
                  adv: torch.Tensor) -> tuple[None, torch.Tensor]:
        logp = token_logps(self.parallel.forward, x, y)
        s = self.settings
        loss, kl = grpo_loss(logp, logp.detach(), adv, y >= 0, s["epsilon"], None, s["kl"],
                             ref if s["kl"] > 0 else None)
        self.stats[-1]["kl"] = kl.item()
        return None, loss

    @torch.no_grad()
    def pass_at_1(self, batch_size: int = 64) -> float:
        """Share of held-out prompts whose greedy completion earns a reward of at least 1."""
        hits = 0
        for i in range(0, len(self.task.val), batch_size):
            chunk = self.task.val[i : i + batch_size]
            for q, (_, text) in zip(chunk, self.complete(chunk, 0.0, None)):
                hits += self.task.score(q, text) >= 1.0
        return hits / len(self.task.val)

    def eval_metrics(self) -> dict[str, float]:
        mean = lambda k: sum(s.get(k, 0.0) for s in self.stats) / max(len(self.stats), 1)  # noqa: E731
        row = {"reward": mean("reward"), "spread": mean("spread"), "kl": mean("kl"),
               "completion_len": mean("completion_len"),
               "pass_at_1": self.pass_at_1()}
        self.stats = []
        return row

    def describe(self, row: dict[str, Any]) -> str:
        return (f"step {row['step']}: loss {row['train_loss']:.4f} reward {row['reward']:.3f} "
                f"pass@1 {row['pass_at_1']:.3f} kl {row['kl']:.4f} length {row['completion_len']:.1f} "
                f"groups with a spread {row['spread']:.2f}")

    def after_record(self) -> None:
        plot_rl(self.history, self.out / RL_PLOT)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "rl": self.settings}

    command = "rl"
    FLAGS = {"digits": "--digits", "group": "--group", "temperature": "--temperature",
             "max_new_tokens": "--max-new-tokens", "kl": "--kl", "epsilon": "--epsilon", "n_val": "--n-val"}

    def run_flags(self) -> list[str]:
        s = self.settings
        flags = ["--task", s["task"], *(["--prompts", s["prompts"]] if s["prompts"] else [])]
        flags += [x for key, flag in self.FLAGS.items() for x in (flag, f"{s[key]:g}")]
        return ["--init-from", str(self.init_from), *flags, *super().run_flags()[4:]]

    def resume(self) -> None:
        from ..io.checkpoint import read_config

        was = read_config(self.out).get("rl", {})
        for key, now in self.settings.items():
            if key in was and was[key] != now:
                raise BardlmError(f"--resume: {key} was {was[key]!r} in this run and is now {now!r}; "
                                  "keep the run's settings")
        super().resume()


def plot_rl(history: list[dict[str, Any]], path: Path) -> None:
    """rl.png: mean training reward and held-out pass@1 against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["reward"] for r in history], label="mean reward (training samples)")
    ax.plot(steps, [r["pass_at_1"] for r in history], label="pass@1 (held-out, greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
