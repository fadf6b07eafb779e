"""Small experiments behind docs/concepts.md: each answers one first-principles question.

`bardlm experiment NAME --out DIR` runs one and writes DIR/NAME.json (its numbers) and, where it
has one, DIR/NAME.png (the figure the docs show); `--quick` runs the same code on a toy budget
(the test suite does, so the docs cannot rot). Every training run of an experiment shares one
`Budget`: same data order, steps, batch, context and learning-rate schedule, so the only thing
that differs between two rows of a table is the option being compared.

  lstm        transformer vs a same-size LSTM language model for the same wall time
  attention   softmax saturation without 1/sqrt(d_k); dot vs additive vs bilinear vs cosine scores
  sharing     separate weights per layer vs one block shared by all layers (ALBERT)
  residual    per-layer gradient norms at init and loss curves, with/without skips and norms
  ablations   pre/post norm, LayerNorm/RMSNorm, GELU/ReLU/SwiGLU, learned/sinusoidal/RoPE/none
  shapes      the shape of every tensor in the forward pass of a preset (markdown table)

With several seeds (`--seeds N`: init, dropout and data order all change with the seed), and
the mean and spread of each row (docs/sources.md, issue 22):

  norms       LayerNorm vs RMSNorm (loss; time per step is bench/norm_speed.py)
  positions   learned vs sinusoidal vs RoPE, trained at the budget's context, scored at 1x 2x 4x
  gqa         1, 2, 4, 8 query heads per key/value head: loss and KV-cache bytes
  tying       tied vs untied output head, at equal steps and at equal parameters
  lstm        (above) also takes --seeds
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
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, TrainConfig, preset
from ..errors import BardlmError
from ..nn.model import GPT
from ..tokenizers import CharTokenizer
from ..train.data import Batches, load_corpus, split_ids, val_windows
from ..train.loop import Diverged, Loop, window_batches
from ..train.loop import evaluate as evaluate_loss


# Budget and data ---------------------------------------------------------------------------
@dataclass
class Budget:
    """The shared model size and training budget of an experiment's runs."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    warmup: int = 30
    eval_every: int = 50
    eval_windows: int = 200  # validation windows for the loss curves (the tables use all)
    seconds: float = 60.0  # wall time of each run in time-budgeted experiments (lstm)
    seed: int = 1337
    seeds: int = 1  # runs per row in the seeded experiments: seed, seed + 1, ...
    decode_contexts: tuple[int, ...] = (256, 1024, 4096)  # window: KV cache and decode speed there
    decode_runs: int = 3  # window: decode timings per context (the median is reported)
    long_contexts: tuple[int, ...] = (512, 4096, 32768)  # hybrid: cache and decode speed there

    def model(self, vocab_size: int, **changes: Any) -> ModelConfig:
        """char-tiny's style (pre-norm LayerNorm, GELU, learned positions) at this size."""
        base = dict(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd, bias=False)
        return ModelConfig(**{**base, **changes})

    def train_config(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, max_iters=self.steps, lr=self.lr,
                           min_lr=self.lr / 10, warmup_iters=self.warmup, seed=self.seed)


FULL = Budget()
QUICK = Budget(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, steps=8, warmup=2,
               eval_every=4, eval_windows=8, seconds=1.5, decode_contexts=(64,), decode_runs=1,
               long_contexts=(64,))


@dataclass
class Data:
    """Character-level ids of a corpus, split 90/10, with batches and validation windows."""

    vocab_size: int
    batches: Batches
    val: torch.Tensor  # (N, T + 1) all validation windows
    val_curve: torch.Tensor  # an evenly spread subset of `val` for the loss curves
    val_ids: np.ndarray | None = None  # the validation split as one token array

    @classmethod
    def load(cls, budget: Budget, data: str | None = None, max_val: int | None = None) -> Data:
        text, _ = load_corpus(data)  # None: DEFAULT_CORPUS, tiny Shakespeare shipped with bardlm
        tok = CharTokenizer.train(text)
        ids = np.asarray(tok.encode(text), dtype=np.int32)
        train, val = split_ids(ids, len(text))
        windows = val_windows(val.ids, budget.block_size)
        if max_val is not None:
            windows = windows[:max_val]
        pick = torch.linspace(0, len(windows) - 1, min(budget.eval_windows, len(windows))).long()
        return cls(tok.vocab_size, Batches(train.ids, budget.block_size, budget.seed), windows,
                   windows[pick], val.ids)

    def reseeded(self, seed: int) -> Data:
        """The same split with the training batches drawn in the order of `seed`."""
        return dataclasses.replace(self, batches=Batches(self.batches.ids, self.batches.T, seed))


# Every run trains with the library's own loop (train/loop.py) --------------------------------
def evaluate(model: nn.Module, windows: torch.Tensor, device: str, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) of `model` over windows (N, T + 1)."""
    return evaluate_loss(model, window_batches(windows, batch_size), device)


class Run:
    """One model being trained on `data` under `budget`: step by step, timing only the steps."""

    def __init__(self, model: nn.Module, data: Data, budget: Budget, device: str = "cpu",
                 timed: bool = False) -> None:
        torch.manual_seed(budget.seed)
        self.model, self.data, self.budget, self.device = model.to(device).train(), data, budget, device
        cfg = dataclasses.replace(budget.train_config(), device=device)
        if timed:  # the step count is not known in advance: constant lr after warm-up
            cfg = dataclasses.replace(cfg, schedule="constant")
        self.loop = Loop(model, cfg)
        self.train_s, self.loss = 0.0, float("nan")
        self.history = [_point(0, self.loss, self.eval_curve(), 0.0)]

    @property
    def step_count(self) -> int:
        return self.loop.step

    def eval_curve(self) -> float:
        return evaluate(self.model, self.data.val_curve, self.device)

    def step(self) -> None:
        t0 = time.perf_counter()
        try:
            self.loss = self.loop.train_step(lambda step, micro: self.data.batches.batch(step, self.budget.batch_size))
        except Diverged as e:  # a diverged run is a result too: it stops here
            self.loss = e.loss
            self.loop.step += 1
        self.train_s += time.perf_counter() - t0
        if self.step_count % self.budget.eval_every == 0:
            self.history.append(_point(self.step_count, self.loss, self.eval_curve(), self.train_s))

    @property
    def diverged(self) -> bool:
        return self.step_count > 0 and not math.isfinite(self.loss)

    def result(self) -> dict[str, Any]:
        """Loss curve, final loss over the whole validation split, tokens/s, parameter count."""
        if self.history[-1]["step"] != self.step_count:
            self.history.append(_point(self.step_count, self.loss, self.eval_curve(), self.train_s))
        b = self.budget
        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "steps": self.step_count,
            "train_s": self.train_s,
            "tokens_per_s": self.step_count * b.batch_size * b.block_size / max(self.train_s, 1e-9),
            "val_loss": evaluate(self.model, self.data.val, self.device),
            "history": self.history,
        }


def train_lm(model: nn.Module, data: Data, budget: Budget, device: str = "cpu") -> dict[str, Any]:
    """Train any `model(idx, targets) -> (logits, loss)` for `budget.steps` steps (a `Run`)."""
    run = Run(model, data, budget, device)
    while run.step_count < budget.steps and not run.diverged:  # a diverged run is a result too
        run.step()
    return run.result()


def train_for_time(models: dict[str, nn.Module], data: Data, budget: Budget, device: str = "cpu"
                   ) -> dict[str, dict[str, Any]]:
    """Train several models for `budget.seconds` of training time each, interleaving their steps
    (one step of each in turn), so a machine whose load changes slows them all alike."""
    runs = {name: Run(m, data, budget, device, timed=True) for name, m in models.items()}
    while active := [r for r in runs.values() if r.train_s < budget.seconds and not r.diverged]:
        for run in active:
            run.step()
    return {name: run.result() for name, run in runs.items()}


def _point(step: int, train_loss: float, val_loss: float, elapsed: float) -> dict[str, float]:
    return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "elapsed_s": elapsed}


def train_variants(
    variants: dict[str, dict[str, Any]], data: Data, budget: Budget, device: str, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """One `train_lm` run of a GPT per variant (ModelConfig field changes), same budget."""
    runs = {}
    for name, changes in variants.items():
        torch.manual_seed(budget.seed)  # same initial weights wherever the shapes agree
        model = GPT(budget.model(data.vocab_size, **changes))
        runs[name] = {"changes": changes, **train_lm(model, data, budget, device)}
        log(f"{name}: val loss {runs[name]['val_loss']:.4f} after {runs[name]['steps']} steps "
            f"({runs[name]['train_s']:.1f} s)")
    return runs


# Experiment: transformer vs LSTM -----------------------------------------------------------
class LSTMLM(nn.Module):
    """A character-level LSTM language model: embed -> nn.LSTM (n_layer) -> linear head.

    The hidden state (h, c) carries everything about the past from one step to the next, so
    position t cannot be computed before position t - 1: time is handled by recurrence.
    """

    def __init__(self, vocab_size: int, hidden: int, n_layer: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=n_layer, batch_first=True)
        self.lm_head = nn.Linear(hidden, vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V), loss."""
        h, _ = self.lstm(self.wte(idx))  # (B, T, hidden), computed one step at a time inside
        logits = self.lm_head(h)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def lstm_matching(n_params: int, vocab_size: int, n_layer: int) -> LSTMLM:
    """The LSTMLM with `n_layer` layers whose parameter count is closest to `n_params`."""
    def count(h: int) -> int:
        return 2 * vocab_size * h + vocab_size + n_layer * (8 * h * h + 8 * h)

    hidden = min(range(4, 2048, 4), key=lambda h: abs(count(h) - n_params))
    return LSTMLM(vocab_size, hidden, n_layer)


def exp_lstm(data: Data, budget: Budget, device: str, log: Callable[[str], None],
             lstm_layers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """The transformer of the budget vs LSTMs of (about) its parameter count, same wall time;
    once per seed (`budget.seeds`), each row the mean over seeds."""
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds_of(budget):
        b, d = dataclasses.replace(budget, seed=seed), data.reseeded(seed)
        torch.manual_seed(seed)
        models: dict[str, nn.Module] = {f"transformer ({b.n_layer} layers)": GPT(b.model(d.vocab_size))}
        n_params = next(iter(models.values())).num_params()
        for n in lstm_layers:
            torch.manual_seed(seed)
            lstm = lstm_matching(n_params, d.vocab_size, n)
            models[f"LSTM ({n} layer{'s' * (n > 1)}, hidden {lstm.lstm.hidden_size})"] = lstm
        for name, run in train_for_time(models, d, b, device).items():
            per_seed.setdefault(name, []).append(run)
            log(f"seed {seed} {name}: {run['params']:,} params, {run['tokens_per_s']:,.0f} "
                f"tokens/s, {run['steps']} steps, val loss {run['val_loss']:.4f}")
    return {"runs": {name: summarise(runs) for name, runs in per_seed.items()}}


def plot_lstm(result: dict[str, Any], path: Path) -> None:
    fig, ax = _figure(1)
    for name, run in result["runs"].items():
        h = run["history"]
        ax[0].plot([p["elapsed_s"] for p in h], [p["val_loss"] for p in h],
                   label=f"{name} ({run['params']:,} params, {run['tokens_per_s']:,.0f} tok/s)")
    _labels(ax[0], "training time (s)", "validation loss (nats/char)", "same data, same wall time")
    _save(fig, path)


# Experiment: attention scores --------------------------------------------------------------
def softmax_saturation(dims: tuple[int, ...] = (4, 16, 64, 256, 1024), n_keys: int = 64,
                       n_queries: int = 512, seed: int = 0) -> list[dict[str, float]]:
    """With q, k ~ N(0, I_D), q.k has variance D: watch softmax saturate unless divided by sqrt(D).

    For each D: the std of the logits, the mean largest attention weight, the mean entropy (nats,
    uniform = log n_keys) and the mean norm of the softmax Jacobian, scaled and unscaled.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d in dims:
        q = torch.randn(n_queries, d, generator=g)
        k = torch.randn(n_keys, d, generator=g)
        row: dict[str, float] = {"d_k": d}
        for name, logits in (("unscaled", q @ k.T), ("scaled", q @ k.T / math.sqrt(d))):
            p = logits.softmax(-1)  # (n_queries, n_keys)
            # d softmax / d logits = diag(p) - p p^T: its norm -> 0 as p becomes one-hot.
            jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            row[f"{name}_logit_std"] = logits.std().item()
            row[f"{name}_max_weight"] = p.max(-1).values.mean().item()
            row[f"{name}_entropy"] = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
            row[f"{name}_grad_norm"] = torch.linalg.matrix_norm(jac).mean().item()
        rows.append(row)
    return rows


SCORES = ("dot", "dot_unscaled", "additive", "bilinear", "cosine")


def exp_attention(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    variants = {s: {"attn_score": s, "attn_impl": "explicit"} for s in SCORES}
    return {"saturation": softmax_saturation(),
            "runs": train_variants(variants, data, budget, device, log)}


def plot_attention(result: dict[str, Any], path: Path) -> None:
    fig, ax = _figure(2)
    sat = result["saturation"]
    d = [r["d_k"] for r in sat]
    for name, style in (("scaled", "-o"), ("unscaled", "--o")):
        ax[0].plot(d, [r[f"{name}_max_weight"] for r in sat], style, label=f"largest weight, {name}")
        ax[0].plot(d, [r[f"{name}_grad_norm"] for r in sat], style, label=f"softmax Jacobian norm, {name}")
    ax[0].set_xscale("log")
    _labels(ax[0], "d_k", "value", "softmax(q.k) with and without 1/sqrt(d_k)")
    _plot_curves(ax[1], result["runs"], "attention score")
    _save(fig, path)


# Experiment: shared layers -----------------------------------------------------------------
def exp_sharing(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    variants = {
        f"separate ({budget.n_layer} blocks)": {},
        f"shared (1 block applied {budget.n_layer}x)": {"share_layers": True},
        "one layer (1 block applied 1x)": {"n_layer": 1},
    }
    return {"runs": train_variants(variants, data, budget, device, log)}


def plot_curves_only(title: str) -> Callable[[dict[str, Any], Path], None]:
    def plot(result: dict[str, Any], path: Path) -> None:
        fig, ax = _figure(1)
        _plot_curves(ax[0], result["runs"], title)
        _save(fig, path)

    return plot


# Experiment: residual connections and norms ------------------------------------------------
RESIDUAL_VARIANTS = {
    "residual + LayerNorm": {},
    "residual, no norm": {"norm": "none"},
    "no residual, LayerNorm": {"residual": False},
    "no residual, no norm": {"residual": False, "norm": "none"},
}


def layer_grad_norms(model: GPT, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The gradient norm of each block's parameters (all of them together) for one batch."""
    model.zero_grad(set_to_none=True)
    model(x, y)[1].backward()
    norms = []
    for block in model.transformer.h:
        grads = [p.grad.flatten() for p in block.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm().item() if grads else 0.0)
    model.zero_grad(set_to_none=True)
    return norms


def exp_residual(data: Data, budget: Budget, device: str, log: Callable[[str], None],
                 depth: int | None = None) -> dict[str, Any]:
    depth = depth or 3 * budget.n_layer
    x, y = data.batches.batch(0, budget.batch_size)
    grads = {}
    for name, changes in RESIDUAL_VARIANTS.items():
        torch.manual_seed(budget.seed)
        grads[name] = layer_grad_norms(GPT(budget.model(data.vocab_size, n_layer=depth, **changes)), x, y)
        log(f"{name}: gradient norm layer 1 {grads[name][0]:.2e}, layer {depth} {grads[name][-1]:.2e}")
    return {"depth_for_grad_norms": depth, "grad_norms": grads,
            "runs": train_variants(RESIDUAL_VARIANTS, data, budget, device, log)}


def plot_residual(result: dict[str, Any], path: Path) -> None:
    fig, ax = _figure(2)
    for name, norms in result["grad_norms"].items():
        zero = all(n == 0 for n in norms)  # a log axis cannot show 0: say so in the legend
        ax[0].plot(range(1, len(norms) + 1), [n if n > 0 else float("nan") for n in norms], "-o",
                   label=f"{name} (all exactly 0)" if zero else name)
    ax[0].set_yscale("log")
    _labels(ax[0], "layer", "gradient norm of the block's weights",
            f"at initialisation, {result['depth_for_grad_norms']} layers")
    _plot_curves(ax[1], result["runs"], "training")
    _save(fig, path)


# Experiment: architecture ablations --------------------------------------------------------
def ablation_variants(budget: Budget) -> dict[str, dict[str, Any]]:
    """The baseline (pre-norm, LayerNorm, GELU, learned positions) and one change per row."""
    # SwiGLU has three matrices, not two: 8/3 * C hidden units keep the parameter count.
    swiglu_hidden = int(8 * budget.n_embd / 3 + 7) // 8 * 8
    return {
        "baseline (pre-norm, LayerNorm, GELU, learned)": {},
        "post-norm": {"norm_placement": "post"},
        "RMSNorm": {"norm": "rmsnorm"},
        "ReLU": {"ffn": "relu"},
        "SwiGLU": {"ffn": "swiglu", "ffn_hidden": swiglu_hidden},
        "sinusoidal positions": {"pos": "sinusoidal"},
        "rotary positions (RoPE)": {"pos": "rope"},
        "no positions (NoPE)": {"pos": "none"},
    }


def exp_ablations(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    return {"runs": train_variants(ablation_variants(budget), data, budget, device, log)}


# Shapes of the forward pass ----------------------------------------------------------------
def forward_shapes(cfg: ModelConfig, B: str | int = "B", T: str | int = "T") -> list[tuple[str, str, tuple]]:
    """(step, tensor, shape) for one forward pass of `cfg` on idx (B, T), from the config alone.

    A test checks these against the shapes a real forward pass produces for small presets.
    """
    C, H, Hkv, D, V = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size
    F_ = cfg.ffn_hidden
    rows: list[tuple[str, str, tuple]] = [("input", "idx", (B, T)), ("wte(idx)", "x", (B, T, C))]
    if cfg.pos in ("learned", "sinusoidal"):
        rows.append((f"+ {cfg.pos} positions (block_size={cfg.block_size})", "x", (B, T, C)))
    rows += [
        (f"ln_1 ({cfg.norm})", "h", (B, T, C)),
        ("c_attn(h): q, k, v in one fused projection", "qkv", (B, T, H * D + 2 * Hkv * D)),
        ("split + view + transpose", "q", (B, H, T, D)),
        ("", "k, v", (B, Hkv, T, D)),
    ]
    if cfg.qk_norm:
        rows += [("q_norm(q) (RMSNorm over each head's D)", "q", (B, H, T, D)),
                 ("k_norm(k)", "k", (B, Hkv, T, D))]
    if cfg.pos == "rope":
        rows += [("apply_rope(q)", "q", (B, H, T, D)), ("apply_rope(k)", "k", (B, Hkv, T, D))]
    if Hkv != H:
        rows.append((f"GQA: each k/v head serves {H // Hkv} query heads", "k, v (repeated)", (B, H, T, D)))
    rows += [
        ("q @ k^T / sqrt(d_k), causal mask, softmax", "att", (B, H, T, T)),
        ("att @ v", "y", (B, H, T, D)),
        ("transpose + reshape", "y", (B, T, H * D)),
        ("c_proj(y); x + ...", "x", (B, T, C)),
        (f"ln_2 ({cfg.norm})", "h", (B, T, C)),
    ]
    if cfg.ffn == "swiglu":
        rows += [("c_fc(h): gate and up in one fused projection", "gate, up", (B, T, 2 * F_)),
                 ("silu(gate) * up", "h", (B, T, F_))]
    else:
        rows += [("c_fc(h)", "h", (B, T, F_)), (f"{cfg.ffn}(h)", "h", (B, T, F_))]
    rows += [
        ("c_proj(h); x + ...", "x", (B, T, C)),
        (f"... blocks 2..{cfg.n_layer} (same shapes)", "x", (B, T, C)),
        (f"ln_f ({cfg.norm})", "x", (B, T, C)),
        ("lm_head(x)" + (" (tied to wte)" if cfg.tie_embeddings else ""), "logits", (B, T, V)),
    ]
    return rows


def shapes_markdown(name: str) -> str:
    cfg = preset(name)
    lines = [f"| step | tensor | shape ({name}) |", "| --- | --- | --- |"]
    for step, tensor, shape in forward_shapes(cfg):
        dims = ", ".join(f"{d:,}" if isinstance(d, int) else d for d in shape)
        lines.append(f"| {step} | `{tensor}` | ({dims}) |")
    return "\n".join(lines)


SHAPE_PRESETS = ("gpt2-124m", "llama-3.2-1b", "qwen3-0.6b")


def exp_shapes(data: Data | None, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    tables = {name: shapes_markdown(name) for name in SHAPE_PRESETS}
    for name, table in tables.items():
        log(f"\n{name}\n{table}")
    return {"tables": tables}


# Seeded experiments (issue 22): every row trained once per seed, mean and spread reported -----
def seeds_of(budget: Budget) -> list[int]:
    return [budget.seed + i for i in range(budget.seeds)]


def summarise(runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One table row from the runs of one variant (one per seed): the means, the sample
    standard deviation of the validation loss, every seed's loss, the first seed's curve."""
    losses = [r["val_loss"] for r in runs]
    return {
        **extra,
        "params": runs[0]["params"],
        "steps": runs[0]["steps"],
        "train_s": float(np.mean([r["train_s"] for r in runs])),
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in runs])),
        "val_loss": float(np.mean(losses)),
        "val_loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
        "val_losses": losses,
        "seeds": len(runs),
        "history": runs[0]["history"],
    }


def seeded_variants(
    variants: dict[str, dict[str, Any]], data: Data, budget: Budget, device: str,
    log: Callable[[str], None], after: Callable[[GPT, Data], dict[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """`train_variants` once per seed. Seeds are the outer loop, so a machine whose load drifts
    slows every variant alike. `after(model, data)` adds metrics of each trained model (e.g.
    losses at longer contexts); their means and spreads go into the row as `NAME` and `NAME_std`."""
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for seed in seeds_of(budget):
        b, d = dataclasses.replace(budget, seed=seed), data.reseeded(seed)
        for name, changes in variants.items():
            torch.manual_seed(seed)
            model = GPT(b.model(d.vocab_size, **changes))
            run = train_lm(model, d, b, device)
            if after is not None:
                run.update(after(model, d))
            per_seed[name].append(run)
            log(f"seed {seed} {name}: val loss {run['val_loss']:.4f} ({run['train_s']:.1f} s)")
    rows = {}
    for name, runs in per_seed.items():
        extra = {"changes": variants[name]}
        for key in (after(None, data) if after is not None else {}):  # the metric names
            values = [r[key] for r in runs]
            extra[key] = float(np.mean(values))
            extra[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows[name] = summarise(runs, **extra)
    return rows


def exp_norms(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """LayerNorm vs RMSNorm at equal budget (the time per step: bench/norm_speed.py)."""
    variants = {"LayerNorm": {"norm": "layernorm"}, "RMSNorm": {"norm": "rmsnorm"}}
    return {"runs": seeded_variants(variants, data, budget, device, log)}


LENGTH_FACTORS = (1, 2, 4)  # score at 1x, 2x and 4x the training context
LEARNED_STRIDE = 16  # learned positions beyond their table: a sliding window moved 16 tokens


def long_context_losses(model: GPT | None, data: Data, n_tokens: int = 16_385,
                        device: str = "cpu") -> dict[str, float]:
    """Loss (nats/token) on the first `n_tokens` of the validation split, read in windows of
    L = 1, 2 and 4 times the training context, keys `loss_at_L`.

    RoPE and sinusoidal positions have no table end: the model is rebuilt with block_size L
    (same weights) and reads non-overlapping windows of L. A learned table has no row past
    its context, so the policy there is a sliding window of the last `block_size` tokens,
    moved `LEARNED_STRIDE` tokens at a time (every scored token sees 48-63 earlier tokens at
    context 64), whatever L is. `model=None` returns the keys only.
    """
    from ..eval.perplexity import perplexity_of_ids

    T = data.batches.T
    if model is None:
        return {f"loss_at_{f * T}": 0.0 for f in LENGTH_FACTORS}
    ids = [int(i) for i in data.val_ids[:n_tokens]]
    out = {}
    for f in LENGTH_FACTORS:
        L = f * T
        if f == 1:
            m, S = model, L
        elif model.config.pos == "learned":
            m, L, S = model, T, LEARNED_STRIDE
        else:
            m = GPT(model.config.replace(block_size=L)).to(device)
            m.load_state_dict(model.state_dict())
            S = L
        m.eval()
        out[f"loss_at_{f * T}"] = perplexity_of_ids(m, ids, len(ids), max_length=L, stride=S,
                                                     batch_size=16).loss
    model.train()
    return out


def exp_positions(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    variants = {"learned": {"pos": "learned"}, "sinusoidal": {"pos": "sinusoidal"},
                "RoPE": {"pos": "rope"}}
    return {"learned_policy": f"sliding window of the last {budget.block_size} tokens, stride "
                              f"{LEARNED_STRIDE}",
            "runs": seeded_variants(variants, data, budget, device, log,
                                    after=lambda m, d: long_context_losses(m, d, device=device))}


def plot_positions(result: dict[str, Any], path: Path) -> None:
    fig, ax = _figure(2)
    _plot_curves(ax[0], result["runs"], "trained at the budget's context")
    for name, run in result["runs"].items():
        keys = sorted((k for k in run if k.startswith("loss_at_") and not k.endswith("_std")),
                      key=lambda k: int(k.rsplit("_", 1)[1]))
        ax[1].errorbar([int(k.rsplit("_", 1)[1]) for k in keys], [run[k] for k in keys],
                       yerr=[run[k + "_std"] for k in keys], fmt="-o", capsize=3, label=name)
    ax[1].set_xscale("log", base=2)
    _labels(ax[1], "tokens read at once (learned: sliding window)", "validation loss (nats/char)",
            "scored at 1x, 2x, 4x the training context")
    _save(fig, path)


GQA_HEADS = 8  # query heads; the KV heads are 8, 4, 2, 1


def exp_gqa(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """n_head = 8 query heads sharing 8 (MHA), 4, 2 or 1 (MQA) key/value heads. KV-cache bytes
    per token (fp32) = 2 (k and v) x n_layer x n_kv_head x head_dim x 4."""
    head_dim = budget.n_embd // GQA_HEADS
    variants = {}
    for group in (1, 2, 4, 8):
        n_kv = GQA_HEADS // group
        variants[f"{group} query heads per KV head ({n_kv} KV)"] = {"n_head": GQA_HEADS, "n_kv_head": n_kv}
    runs = seeded_variants(variants, data, budget, device, log)
    for row in runs.values():
        row["kv_bytes_per_token"] = 2 * budget.n_layer * row["changes"]["n_kv_head"] * head_dim * 4
    return {"runs": runs}


def exp_tying(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Tied vs untied head at equal steps, and a tied model given the untied one's parameters
    back as FFN width (each hidden unit costs 2 C weights per layer: bias=False)."""
    spare = data.vocab_size * budget.n_embd  # what untying adds: one V x C matrix
    extra_hidden = round(spare / (2 * budget.n_embd * budget.n_layer))
    variants = {
        "tied": {"tie_embeddings": True},
        "untied (equal steps)": {"tie_embeddings": False},
        f"tied, FFN +{extra_hidden} (equal parameters)": {
            "tie_embeddings": True, "ffn_hidden": 4 * budget.n_embd + extra_hidden},
    }
    return {"runs": seeded_variants(variants, data, budget, device, log)}


WINDOW_LAYERS = ["local"] * 5 + ["global"]  # Gemma 3's 5:1 pattern, the global layer last
DECODE_NEW = 16  # tokens timed per decode measurement


def window_variants(budget: Budget) -> dict[str, dict[str, Any]]:
    """Six RoPE layers all global, or five local (window = a quarter of the training context)
    and one global: the same shape and parameters, only the mask and the cache differ."""
    base = {"n_layer": len(WINDOW_LAYERS), "pos": "rope"}
    window = budget.block_size // 4
    return {"full attention (6 global)": base,
            f"5 local (window {window}) : 1 global": {**base, "sliding_window": window,
                                                       "attn_layers": WINDOW_LAYERS}}


def decode_tokens_per_s(model: GPT, context: int) -> float:
    """B=1 greedy decoding with a KV cache at `context` positions: a prompt of context -
    DECODE_NEW - 1 tokens is prefilled (untimed) with the first new token, then DECODE_NEW tokens
    are timed one by one, the last at position context - 1 (one more would slide the window:
    a new prefill)."""
    from ..infer.generate import stream_ids

    prompt = torch.randint(0, model.config.vocab_size, (1, context - DECODE_NEW - 1),
                           generator=torch.Generator().manual_seed(0))
    steps = stream_ids(model, prompt, DECODE_NEW + 1, temperature=0.0, max_context=context)
    with torch.no_grad():
        next(steps)  # the prefill and the first new token
        t = time.perf_counter()
        n = sum(1 for _ in steps)
    return n / max(time.perf_counter() - t, 1e-9)


PREFILL_CHUNK = 1024  # hybrid: prompt tokens per prefill pass (a 32k prompt in one pass would
# need the 32k x 32k scores of each head wherever SDPA takes its math path: 16 GiB at 4 heads)


def chunked_decode_tokens_per_s(model: GPT, context: int) -> float:
    """As `decode_tokens_per_s`, with the prompt prefilled PREFILL_CHUNK tokens a pass into a
    cache of `context` positions, then DECODE_NEW greedy tokens timed, one forward each."""
    n = context - DECODE_NEW - 1
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    cache = model.make_cache(1, context)
    with torch.no_grad():
        for i in range(0, n, PREFILL_CHUNK):
            logits, _ = model(prompt[:, i:i + PREFILL_CHUNK], start_pos=i, cache=cache, logits_rows=1)
        t = time.perf_counter()
        for pos in range(n, n + DECODE_NEW):
            logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), start_pos=pos, cache=cache,
                              logits_rows=1)
    return DECODE_NEW / max(time.perf_counter() - t, 1e-9)


def exp_window(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Full attention against 5 local : 1 global layers at equal steps: the validation loss a
    window costs, and, at each of budget.decode_contexts (past the training context: RoPE runs
    there), one sequence's KV cache (MiB, fp32, measured from `make_cache`) and B=1 decode speed.
    The decode timings of the two models alternate (the median of budget.decode_runs each), so
    a machine whose load drifts slows both alike."""
    trained: list[GPT] = []

    def cache_mib(model: GPT | None, _data: Data) -> dict[str, float]:
        if model is not None:
            trained.append(model.eval())
        return {f"kv_mib_at_{ctx}": 0.0 if model is None else
                sum(c.nbytes() for c in model.make_cache(1, ctx)) / 2**20 for ctx in budget.decode_contexts}

    runs = seeded_variants(window_variants(budget), data, budget, device, log, cache_mib)
    models = dict(zip(runs, trained[-len(runs):]))  # the last seed's (speed does not depend on it)
    decode_tokens_per_s(models[next(iter(models))], budget.decode_contexts[0])  # warm-up
    for ctx in budget.decode_contexts:
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(budget.decode_runs):
            for name, model in models.items():
                times[name].append(decode_tokens_per_s(model, ctx))
        for name in models:
            runs[name][f"decode_tps_at_{ctx}"] = float(np.median(times[name]))
        log(f"decode at {ctx}: " + ", ".join(f"{n} {runs[n][f'decode_tps_at_{ctx}']:.0f} tok/s" for n in models))
    return {"runs": runs}


HYBRID_LAYERS = ["linear"] * 3 + ["global"]  # Qwen3.5's 3:1 pattern, the attention layer last


def hybrid_variants(budget: Budget, vocab_size: int) -> dict[str, dict[str, Any]]:
    """Dense GQA (every layer attention), the 3:1 gated delta rule hybrid and latent attention
    (MLA), all of the budget's width and depth, in Qwen's style (RoPE, RMSNorm, SwiGLU). The
    attention layers are the same in the first two (n_head query heads sharing n_head / 2 KV
    heads); each linear layer has n_head / 2 key heads and n_head value heads of head_dim, and the
    hybrid's FFN width is the one that gives it the dense model's parameter count (the linear
    layers' own count differs from an attention layer's)."""
    head_dim = budget.n_embd // budget.n_head
    style = {"pos": "rope", "norm": "rmsnorm", "ffn": "swiglu", "n_layer": len(HYBRID_LAYERS)}
    dense = {**style, "n_kv_head": budget.n_head // 2}
    linear = {"attn_layers": HYBRID_LAYERS, "linear_k_heads": budget.n_head // 2,
              "linear_v_heads": budget.n_head, "linear_k_head_dim": head_dim,
              "linear_v_head_dim": head_dim}
    target = GPT(budget.model(vocab_size, **dense)).num_params()
    base = budget.model(vocab_size, **dense).ffn_hidden

    def params(ffn: int) -> int:
        with torch.device("meta"):
            return GPT(budget.model(vocab_size, **dense, **linear, ffn_hidden=ffn)).num_params()

    ffn = min(range(base // 2, 2 * base), key=lambda f: abs(params(f) - target))
    mla = {**style, "attn_type": "mla", "kv_lora_rank": 2 * head_dim, "qk_nope_head_dim": head_dim,
           "qk_rope_head_dim": head_dim // 2, "v_head_dim": head_dim}
    return {"dense GQA (4 attention)": dense,
            "3 delta rule : 1 attention": {**dense, **linear, "ffn_hidden": ffn},
            "latent attention (MLA)": mla}


def exp_hybrid(data: Data, budget: Budget, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Dense GQA against the 3:1 delta-rule hybrid at equal parameters and steps (validation loss;
    both trained), and, with MLA of the same width and depth (untrained: speed and memory do not
    depend on the weights), per model: the cache bytes per token and the fixed state per sequence
    (fp32, `infer/budget.py`), the bytes `make_cache` allocates for one sequence, and B=1 greedy
    decoding tokens/s at each of budget.long_contexts (RoPE runs past the training context;
    `chunked_decode_tokens_per_s`), the three models' timings alternating (the median of
    budget.decode_runs each)."""
    from ..infer.budget import kv_bytes_per_token, state_bytes_per_sequence

    variants = hybrid_variants(budget, data.vocab_size)
    trained = dict(list(variants.items())[:2])  # dense and hybrid; MLA is timed only
    kept: list[GPT] = []

    def keep(model: GPT | None, _data: Data) -> dict[str, float]:
        if model is not None:
            kept.append(model.eval())
        return {}

    runs = seeded_variants(trained, data, budget, device, log, keep)
    models = dict(zip(runs, kept[-len(runs):]))  # the last seed's (speed does not depend on it)
    name = list(variants)[2]
    torch.manual_seed(budget.seed)
    models[name] = GPT(budget.model(data.vocab_size, **variants[name])).eval()
    runs[name] = {"changes": variants[name], "params": models[name].num_params()}
    for name, model in models.items():
        cfg = model.config
        runs[name]["cache_bytes_per_token"] = kv_bytes_per_token(cfg, 4)
        runs[name]["state_bytes_per_sequence"] = state_bytes_per_sequence(cfg, 4)
        for ctx in budget.long_contexts:
            runs[name][f"cache_mib_at_{ctx}"] = sum(c.nbytes() for c in model.make_cache(1, ctx)) / 2**20
    chunked_decode_tokens_per_s(models[name], budget.long_contexts[0])  # warm-up
    for ctx in budget.long_contexts:
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(budget.decode_runs):
            for name, model in models.items():
                times[name].append(chunked_decode_tokens_per_s(model, ctx))
        for name in models:
            runs[name][f"decode_tps_at_{ctx}"] = float(np.median(times[name]))
        log(f"decode at {ctx}: " + ", ".join(f"{n} {runs[n][f'decode_tps_at_{ctx}']:.0f} tok/s" for n in models))
    return {"runs": runs}


def plot_hybrid(result: dict[str, Any], path: Path) -> None:
    """Validation loss of the two trained models, and decode speed against the context."""
    fig, (left, right) = _figure(2)
    runs = result["runs"]
    _plot_curves(left, {n: r for n, r in runs.items() if "history" in r}, "equal parameters and steps")
    contexts = result["budget"]["long_contexts"]
    for name, r in runs.items():
        right.plot(contexts, [r[f"decode_tps_at_{c}"] for c in contexts], marker="o", label=name)
    right.set_xscale("log", base=2)
    _labels(right, "context (positions)", "B=1 decode tokens/s", "decode speed")
    _save(fig, path)


# Registry, tables and plotting helpers -----------------------------------------------------
@dataclass
class Experiment:
    run: Callable[..., dict[str, Any]]
    plot: Callable[[dict[str, Any], Path], None] | None
    needs_data: bool = True


EXPERIMENTS: dict[str, Experiment] = {
    "lstm": Experiment(exp_lstm, plot_lstm),
    "attention": Experiment(exp_attention, plot_attention),
    "sharing": Experiment(exp_sharing, plot_curves_only("weights per layer")),
    "residual": Experiment(exp_residual, plot_residual),
    "ablations": Experiment(exp_ablations, plot_curves_only("one change from the baseline")),
    "shapes": Experiment(exp_shapes, None, needs_data=False),
    "norms": Experiment(exp_norms, plot_curves_only("LayerNorm vs RMSNorm")),
    "positions": Experiment(exp_positions, plot_positions),
    "gqa": Experiment(exp_gqa, plot_curves_only("query heads per KV head")),
    "tying": Experiment(exp_tying, plot_curves_only("output head tied or not")),
    "window": Experiment(exp_window, plot_curves_only("full attention vs 5 local : 1 global")),
    "hybrid": Experiment(exp_hybrid, plot_hybrid),
}


def run_experiment(
    name: str, out: str | Path, quick: bool = False, data: str | None = None, device: str = "cpu",
    steps: int | None = None, seconds: float | None = None, log: Callable[[str], None] = print,
    seeds: int | None = None,
) -> dict[str, Any]:
    """Run experiment `name`; write out/NAME.json (and out/NAME.png); return the result."""
    if name not in EXPERIMENTS:
        raise BardlmError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    budget = QUICK if quick else FULL
    for key, value in (("steps", steps), ("seconds", seconds), ("seeds", seeds)):
        if value is not None:
            if value <= 0:
                raise BardlmError(f"--{key} must be positive, got {value}")
            budget = dataclasses.replace(budget, **{key: value})
    exp = EXPERIMENTS[name]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BardlmError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    loaded = Data.load(budget, data, max_val=64 if quick else None) if exp.needs_data else None
    start = time.time()
    result = exp.run(loaded, budget, device, log)
    result = {"experiment": name, "budget": dataclasses.asdict(budget), "device": device,
              "torch_threads": torch.get_num_threads(), "wall_s": time.time() - start, **result}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if exp.plot is not None:
        exp.plot(result, out / f"{name}.png")
    table = results_table(result)
    if table:
        log(table)
    return result


def results_table(result: dict[str, Any]) -> str:
    """A markdown table of the runs of a result: params, steps, tokens/s, validation loss (the
    mean +- sample standard deviation over seeds when there are several; the difference to the
    first row then per seed, mean +- sd), and any extra per-row numbers (losses at longer
    contexts, cache bytes, decode speed). A row of an untrained model (no val loss: the hybrid
    experiment's MLA, timed only) shows its extra numbers alone."""
    runs = result.get("runs")
    if not runs:
        return ""
    first = next(iter(runs.values()))
    extra = [k for k in first if k.startswith(("loss_at_", "kv_mib_at_", "cache_mib_at_", "decode_tps_at_"))
             and not k.endswith("_std")]
    extra += [k for k in ("kv_bytes_per_token", "cache_bytes_per_token", "state_bytes_per_sequence")
              if k in first]
    seeds = first.get("seeds", 1)
    loss_head = f"val loss (mean +- sd, {seeds} seeds)" if seeds > 1 else "val loss"
    vs_head = "vs first row (paired by seed: mean +- sd)" if seeds > 1 else "vs first row"
    lines = [f"| variant | parameters | steps | tokens/s | {loss_head} | {vs_head} | "
             + "".join(f"{k} | " for k in extra),
             "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(extra)]
    for name, r in runs.items():
        cells = "".join(
            f"{r[k]:,} | " if isinstance(r[k], int)
            else f"{r[k]:.3f}" + (f" +- {r[k + '_std']:.3f}" if seeds > 1 and k + "_std" in r else "") + " | "
            for k in extra)
        if "val_loss" not in r:
            lines.append(f"| {name} | {r['params']:,} | untrained | | | | {cells}")
            continue
        loss = f"{r['val_loss']:.3f}" + (f" +- {r['val_loss_std']:.3f}" if seeds > 1 else "")
        vs = f"{r['val_loss'] - first['val_loss']:+.3f}"
        if seeds > 1:  # rows share seeds (same data order, same init of shared weights): pair them
            diffs = [a - b for a, b in zip(r["val_losses"], first["val_losses"], strict=True)]
            vs += f" +- {float(np.std(diffs, ddof=1)):.3f}"
        lines.append(f"| {name} | {r['params']:,} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{loss} | {vs} | {cells}")
    return "\n".join(line.rstrip() for line in lines)


def _figure(n: int):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    return fig, ax[0]


def _plot_curves(ax, runs: dict[str, dict[str, Any]], title: str) -> None:  # noqa: ANN001
    for name, run in runs.items():
        h = [p for p in run["history"] if math.isfinite(p["val_loss"])]
        ax.plot([p["step"] for p in h], [p["val_loss"] for p in h], label=f"{name}: {run['val_loss']:.3f}")
    _labels(ax, "step", "validation loss (nats/char)", title)


def _labels(ax, xlabel: str, ylabel: str, title: str) -> None:  # noqa: ANN001
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
