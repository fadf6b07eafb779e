"""Optimizers and the learning-rate schedule, shared by every training loop in bardlm.

`make_optimizer`: AdamW (weight decay on matrices only) in one of three kernels, or Muon for the
blocks' weight matrices with AdamW for the rest (`MuonAdamW`). `lr_at`: warm-up, then cosine,
noam, constant or warmup-stable-decay (wsd).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): the one schedule of bardlm.

    A linear warm-up to `lr` over `warmup_iters` steps, then
      cosine    decay to `min_lr` at `lr_decay_iters` (default `max_iters`), `min_lr` after;
      noam      lr * sqrt(warmup / step), the 1/sqrt(step) decay of "Attention Is All You Need";
      constant  `lr`;
      wsd       warmup-stable-decay (MiniCPM; nanochat, torchtitan): `lr` until the last
                `decay_fraction` of the steps to `lr_decay_iters` (default `max_iters`), then a
                linear decay to `min_lr` there, `min_lr` after.
    A pure function of the step (and the plan): a resumed run gets the same rates, mid-decay too.
    """
    w = cfg.warmup_iters
    if step < w:
        return cfg.lr * (step + 1) / (w + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "noam":
        return cfg.lr * math.sqrt(max(w, 1) / (step + 1))
    decay = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        # The decay's first step is still at lr, its last (decay - 1) one step short of min_lr.
        start = max(w, decay - round(cfg.decay_fraction * (decay - w)))
        if step < start:
            return cfg.lr
        return cfg.lr - (cfg.lr - cfg.min_lr) * (step - start) / max(1, decay - start)
    ratio = (step - w) / max(1, decay - w)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: biases, norms and gains stay undecayed.

    optimizer="muon": the weight matrices inside the blocks go to Muon instead (see `MuonAdamW`).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and _is_hidden_matrix(n)]
        if hidden:
            return MuonAdamW(hidden, [(n, p) for n, p in params if not (p.dim() == 2 and _is_hidden_matrix(n))], cfg)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    # Same update, three kernels: "fused" does every parameter in one kernel, "foreach" batches
    # the tensor ops across parameters, "loop" is the plain per-parameter Python loop.
    impl = dict(fused=dict(fused=True), foreach=dict(foreach=True), loop=dict(foreach=False),
                muon=dict(fused=True))
    kind = adamw_kernel(cfg.optimizer, params[0][1].device if params else torch.device("cpu"))
    return torch.optim.AdamW(_adamw_groups(decay, no_decay, cfg), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl[kind])


def adamw_kernel(optimizer: str, device: torch.device) -> str:
    """optimizer="auto": the fused kernel on CUDA (one launch for every parameter), foreach
    elsewhere (the faster of the two on a CPU); any other name is itself."""
    if optimizer == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return optimizer


def _adamw_groups(decay: list, no_decay: list, cfg: TrainConfig) -> list[dict[str, Any]]:
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_hidden_matrix(name: str) -> bool:
    """A block's weight matrix (attention and MLP projections), not an embedding or the head:
    those map tokens, not hidden features, and Muon's orthogonalised step does not suit them."""
    return ".h." in f".{name}" and name.endswith(".weight")


class MuonAdamW(torch.optim.Optimizer):
    """Muon (`torch.optim.Muon`) for the blocks' weight matrices, fused AdamW for everything else.

    Muon replaces each matrix's momentum by the nearest orthogonal matrix (5 Newton-Schulz
    iterations) before stepping: every direction of the update moves at the same rate, which
    trains small models in markedly fewer steps (Jordan et al., 2024). With
    adjust_lr_fn="match_rms_adamw" (Moonshot, 2025) its update has AdamW's RMS, so one learning
    rate and schedule drive both halves.

    One Optimizer over both: its groups are the Muon groups then the AdamW groups (the very same
    dicts), and its `state` is shared, so `state_dict`, checkpoints and exact resume work as
    for plain AdamW.
    """

    def __init__(self, hidden: list[torch.Tensor], rest: list[tuple[str, torch.Tensor]], cfg: TrainConfig) -> None:
        self.muon = torch.optim.Muon(
            [{"params": hidden, "weight_decay": cfg.weight_decay}], lr=cfg.lr,
            adjust_lr_fn="match_rms_adamw",
        )
        decay = [p for _, p in rest if p.dim() >= 2]
        no_decay = [p for _, p in rest if p.dim() < 2]
        self.adamw = torch.optim.AdamW(_adamw_groups(decay, no_decay, cfg), lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._link()

    def _link(self) -> None:
        """Point the two inner optimizers at this one's groups and state (after (re)loading)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state mapping
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002
        self.muon.step()
        self.adamw.step()
