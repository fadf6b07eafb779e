"""Checks shared by the tests that hold a bardlm model against a `transformers` one."""

from __future__ import annotations

import torch


def assert_same_logits(ref, ours, idx: torch.Tensor, tol: float = 1e-4) -> None:  # noqa: ANN001
    """Our logits for idx (B, T) equal transformers' `ref(idx).logits` (B, T, V) to `tol`, and
    those logits differ across positions by far more than `tol`, so the check can fail."""
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours(idx)
    assert got.shape == want.shape and want.shape[:2] == idx.shape
    assert (got - want).abs().max().item() < tol
    assert (want[:, 1:] - want[:, :-1]).abs().max().item() > 1e-2
