"""Shared by the speculative-decoding tests (generate and the server): Pearson's chi-square of
sampled counts against exact probabilities, and a draft model that mostly agrees with its target."""

from __future__ import annotations

import copy

import torch
from scipy.stats import chisquare


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of observed counts against probabilities, cells expecting < 5 draws pooled
    into one. A draw in a cell of probability 0 gives 0.0: no sample may land there."""
    n = counts.sum().item()
    expected = probs.double() * n
    if (counts[probs == 0] > 0).any():
        return 0.0
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # the pooled cell's rounding
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A draft that mostly agrees with `model`: a copy of it with N(0, scale^2) noise added to
    every weight (small scale: most guesses accepted; large: many rejected)."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return draft
