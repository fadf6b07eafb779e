"""Shared fixtures: where the corpora are, and small deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """$BARDLM_DATA_DIR (set by .ci/run), else ../shared/data beside the checkout."""
    return Path(os.environ.get("BARDLM_DATA_DIR") or REPO.parent / "shared" / "data")


def corpus(name: str) -> Path:
    path = data_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} not found: set BARDLM_DATA_DIR to a folder holding {name}")
    return path


@pytest.fixture
def tiny_text() -> str:
    return corpus("tiny_shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
