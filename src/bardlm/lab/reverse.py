"""The reversal probe: prove the causal mask on a toy task.

Every example is a random sequence followed by the same sequence reversed:

    BOS x_1 x_2 ... x_L SEP x_L ... x_2 x_1        x_i drawn uniformly from V symbols

A decoder-only model trained on next-token prediction can predict the second half (it has read
the first) but can do no better than chance (1/V) on the first half, because x_{i+1} is
independent of everything before it. If attention leaks the future, x_{i+1} is in plain view and
the first half becomes predictable too. `ReverseConfig(causal=False)` builds exactly such a
broken model (attention without a mask, for this probe only) so a user can see what a leak
looks like.

Token ids: symbols 0..V-1, BOS = V, SEP = V + 1, so the model's vocabulary is V + 2.
Inputs are the first 2L + 1 tokens; the 2L + 1 targets ("positions" below) are
x_1..x_L (first half), SEP, x_L..x_1 (second half).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, TrainConfig
from ..errors import BardlmError
from ..infer.device import resolve_device
from ..nn.model import GPT
from ..progress import progress_bar
from ..train.loop import Loop

RESULT_FILE = "reverse.json"
PLOT_FILE = "reverse.png"
LEARNED = 0.99  # second-half accuracy that counts as "the model learned to reverse"
LEAK_MARGIN = 0.05  # first-half accuracy this far above chance means the future leaked in


@dataclass
class ReverseConfig:
    """One probe run: the task, the (small) model, and its training budget.

    The defaults learn the task (second half >= 0.99) in well under two minutes on a 2-core CPU.
    """

    vocab: int = 16  # V: number of symbols (chance is 1/V)
    length: int = 12  # L: symbols in the first half (the model reads 2L + 1 tokens)
    steps: int = 300
    seed: int = 0
    batch_size: int = 64
    eval_examples: int = 2000  # fresh held-out examples scored after training
    causal: bool = True  # False is the debug switch: attention without a mask, this probe only
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    lr: float = 3e-3
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("vocab", "length", "steps", "batch_size", "eval_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BardlmError(f"reverse: {name} must be a positive integer, got {value!r}")
        if self.vocab < 2:
            raise BardlmError(f"reverse: vocab must be at least 2 (chance is 1/vocab), got {self.vocab}")
        # Held-out examples are kept out of training; that needs room to spare among V^L sequences.
        if self.vocab**self.length < 10 * self.eval_examples:
            raise BardlmError(
                f"reverse: only {self.vocab}^{self.length} = {self.vocab**self.length} distinct "
                f"sequences, too few to hold out {self.eval_examples} unseen examples; "
                f"raise --vocab or --length (or lower --eval-examples)"
            )
        if not self.lr > 0:
            raise BardlmError(f"reverse: lr must be positive, got {self.lr}")
        self.device = str(resolve_device(self.device))  # "auto" -> this machine's best device

    @property
    def bos(self) -> int:
        return self.vocab

    @property
    def sep(self) -> int:
        return self.vocab + 1

    @property
    def chance(self) -> float:
        return 1.0 / self.vocab

    def model_config(self) -> ModelConfig:
        """A small GPT-2-style model whose context is exactly one example's 2L + 1 inputs."""
        return ModelConfig(
            vocab_size=self.vocab + 2, block_size=2 * self.length + 1, n_layer=self.n_layer,
            n_head=self.n_head, n_embd=self.n_embd, bias=False, dropout=0.0,
        )

    def train_config(self) -> TrainConfig:
        """The library's schedule (warm-up + cosine) and AdamW settings for this budget."""
        return TrainConfig(
            batch_size=self.batch_size, max_iters=self.steps, lr=self.lr, min_lr=self.lr / 10,
            warmup_iters=min(50, self.steps // 10), weight_decay=0.1, grad_clip=1.0,
            seed=self.seed, device=self.device,
        )


# Data ---------------------------------------------------------------------------------------
def make_examples(symbols: torch.Tensor, cfg: ReverseConfig) -> torch.Tensor:
    """symbols (N, L) -> examples (N, 2L + 2): BOS, the symbols, SEP, the symbols reversed."""
    n = symbols.shape[0]
    bos = torch.full((n, 1), cfg.bos, dtype=torch.long)
    sep = torch.full((n, 1), cfg.sep, dtype=torch.long)
    return torch.cat([bos, symbols, sep, symbols.flip(1)], dim=1)


def _seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for the weights, the training stream and the held-out set."""
    init, train, held = np.random.SeedSequence(seed).generate_state(3)
    return int(init), int(train), int(held)


def _draw(n: int, cfg: ReverseConfig, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, cfg.vocab, (n, cfg.length), generator=gen)


def _keys(symbols: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row) for row in symbols.tolist()]


def training_symbols(
    cfg: ReverseConfig, gen: torch.Generator, held_out: set[tuple[int, ...]]
) -> torch.Tensor:
    """A fresh (B, L) batch from `gen`, redrawing any row that is one of the held-out examples."""
    symbols = _draw(cfg.batch_size, cfg, gen)
    while True:
        clash = [i for i, key in enumerate(_keys(symbols)) if key in held_out]
        if not clash:
            return symbols
        symbols[clash] = _draw(len(clash), cfg, gen)


# Model --------------------------------------------------------------------------------------
def build_model(cfg: ReverseConfig) -> GPT:
    """The library's GPT; with `cfg.causal=False` its self-attention runs without a mask.

    The switch flips `Attention.causal` on this one model instance after construction: nothing
    global, no config field, so no other model can be built broken by accident.
    """
    init_seed, _, _ = _seeds(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(init_seed)
        model = GPT(cfg.model_config())
    if not cfg.causal:
        for block in model.transformer.h:
            block.attn.causal = False
    return model.to(cfg.device)


def train_probe(
    model: GPT,
    cfg: ReverseConfig,
    held_out: set[tuple[int, ...]],
    progress: bool = False,
) -> float:
    """Train on freshly drawn examples for `cfg.steps` steps; returns the mean loss of the last
    tenth of the steps (nats per target).

    The loss covers every position, the random first half included: a causal model can only
    learn chance there, while a leaking one learns to copy the next token. Training only on the
    second half would hide the leak from the probe.
    """
    loop = Loop(model, cfg.train_config())
    _, train_seed, _ = _seeds(cfg.seed)
    gen = torch.Generator().manual_seed(train_seed)
    bar = progress_bar(progress, cfg.steps, "train")
    tail = max(1, cfg.steps // 10)
    recent: list[float] = []
    model.train()

    def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG001
        ex = make_examples(training_symbols(cfg, gen, held_out), cfg)
        return ex[:, :-1], ex[:, 1:]

    for _ in range(cfg.steps):
        recent = (recent + [loop.train_step(batch)])[-tail:]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{recent[-1]:.3f}")
    if bar is not None:
        bar.close()
    return sum(recent) / len(recent)


# Evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def position_accuracy(model: torch.nn.Module, examples: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Greedy next-token accuracy at each target position: examples (N, 2L + 2) -> (2L + 1,).

    `model(idx)` must return (logits (B, T, V'), ...); the prediction is the argmax over the
    whole vocabulary, so predicting BOS or SEP inside a half counts as wrong.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros(examples.shape[1] - 1)
    for i in range(0, len(examples), batch_size):
        ex = examples[i : i + batch_size].to(device)
        logits = model(ex[:, :-1])[0]
        correct += (logits.argmax(-1) == ex[:, 1:]).sum(0).cpu().float()
    model.train(was_training)
    return correct / len(examples)


def loss_floor(cfg: ReverseConfig) -> float:
    """The lowest mean loss a causal model can reach: ln V on each of the L random targets,
    zero on SEP and the second half. A training loss well below it means a leak."""
    return cfg.length * math.log(cfg.vocab) / (2 * cfg.length + 1)


def position_labels(length: int) -> list[str]:
    """Names of the 2L + 1 targets: x1..xL, SEP, xL..x1."""
    first = [f"x{i}" for i in range(1, length + 1)]
    return first + ["SEP"] + first[::-1]


def summarize(acc: torch.Tensor, cfg: ReverseConfig) -> dict[str, Any]:
    """Per-position accuracy (2L + 1,) -> the probe's numbers and its verdict."""
    L = cfg.length
    first, second = acc[:L].mean().item(), acc[L + 1 :].mean().item()
    if first > cfg.chance + LEAK_MARGIN:
        verdict, message = "leak", (
            f"the first half is predictable ({first:.3f} vs chance {cfg.chance:.3f}): "
            f"attention sees future tokens"
        )
    elif second < LEARNED:
        verdict, message = "undertrained", (
            f"second-half accuracy {second:.3f} < {LEARNED}: the model has not learned to "
            f"reverse yet; raise --steps"
        )
    else:
        verdict, message = "ok", (
            f"second half learned ({second:.3f}), first half at chance ({first:.3f} vs "
            f"{cfg.chance:.3f}): the causal mask holds"
        )
    return {
        "labels": position_labels(L),
        "accuracy": [round(a, 6) for a in acc.tolist()],
        "first_half": first,
        "separator": acc[L].item(),
        "second_half": second,
        "chance": cfg.chance,
        "verdict": verdict,
        "message": message,
    }


# The whole probe ----------------------------------------------------------------------------
def run_reverse(
    cfg: ReverseConfig,
    out: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the probe model, score it on unseen examples, and (with `out`) write
    reverse.json and reverse.png there. Returns the dict written to reverse.json."""
    start = time.time()
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise BardlmError(f"--out {out} is a file; pass a directory")
    _, _, held_seed = _seeds(cfg.seed)
    held_symbols = _draw(cfg.eval_examples, cfg, torch.Generator().manual_seed(held_seed))
    held_out = set(_keys(held_symbols))
    model = build_model(cfg)
    if log is not None:
        log(f"reverse: {model.num_params():,} parameters, {cfg.steps} steps of {cfg.batch_size} "
            f"examples, causal mask {'on' if cfg.causal else 'OFF (debug)'}")
    final_loss = train_probe(model, cfg, held_out, progress)
    acc = position_accuracy(model, make_examples(held_symbols, cfg))
    result = {
        "config": dataclasses.asdict(cfg),
        **summarize(acc, cfg),
        "train_loss": final_loss,
        "loss_floor": loss_floor(cfg),
        "parameters": model.num_params(),
        "elapsed_s": round(time.time() - start, 2),
    }
    if out is not None:
        write_results(result, Path(out))
    return result


def write_results(result: dict[str, Any], out: Path) -> None:
    """reverse.json and reverse.png in `out` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot_accuracy(result, out / PLOT_FILE)


def plot_accuracy(result: dict[str, Any], path: Path) -> None:
    """A bar per target position, coloured by half, with the chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, labels, acc = result["config"], result["labels"], result["accuracy"]
    L = cfg["length"]
    colors = ["tab:blue"] * L + ["tab:gray"] + ["tab:green"] * L
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(acc)), acc, color=colors)
    ax.axhline(result["chance"], color="tab:red", linestyle="--", linewidth=1,
               label=f"chance 1/{cfg['vocab']}")
    ax.set_xticks(range(len(acc)), labels, fontsize=7)
    ax.set_ylim(0, 1.2)  # headroom above the 1.0 bars for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("next-token accuracy")
    ax.set_xlabel("target (first half, separator, second half) on unseen examples")
    mask = "causal mask on" if cfg["causal"] else "causal mask OFF (debug)"
    ax.set_title(
        f"reversal probe, {mask}: first half {result['first_half']:.3f}, "
        f"second half {result['second_half']:.3f}", fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8, ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """The short summary the CLI prints."""
    cfg, L = result["config"], result["config"]["length"]
    rows = [
        ("first half", f"x1..x{L}", result["first_half"]),
        ("separator", "SEP", result["separator"]),
        ("second half", f"x{L}..x1", result["second_half"]),
        ("chance", f"1/{cfg['vocab']}", result["chance"]),
    ]
    lines = [f"{'part':<12} {'targets':<10} accuracy"]
    lines += [f"{name:<12} {span:<10} {value:.3f}" for name, span, value in rows]
    lines.append("by position: " + " ".join(f"{a:.2f}" for a in result["accuracy"]))
    lines.append(f"train loss {result['train_loss']:.3f} (causal floor {result['loss_floor']:.3f})")
    lines.append(f"{result['verdict'].upper()}: {result['message']}")
    return "\n".join(lines)


__all__ = [
    "ReverseConfig", "build_model", "make_examples", "training_symbols", "train_probe",
    "position_accuracy", "run_reverse", "summarize", "format_table", "plot_accuracy", "loss_floor",
]
