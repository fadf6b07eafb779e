"""pyproject.toml tells the truth (bug 10): the torch minimum is one that has every torch API
bardlm calls, Python's minimum matches what ruff checks the code against, and every
package-data file exists (an installed bardlm has its playground, its default corpus and its
py.typed marker)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the check is the same on any Python

# The newest torch API bardlm calls, and the release that introduced it: torch.optim.Muon
# (train/optim.py, optimizer=muon) arrived in 2.9; FSDP2's public `fully_shard` in 2.6,
# scaled_dot_product_attention(enable_gqa=...) in 2.5.
TORCH_MINIMUM = (2, 9)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_torch_lower_bound_has_every_api_bardlm_uses() -> None:
    deps = [d for d in pyproject()["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert len(deps) == 1, deps
    found = re.search(r">=\s*(\d+)\.(\d+)", deps[0])
    assert found, f"torch has no lower bound: {deps[0]!r}"
    assert (int(found[1]), int(found[2])) >= TORCH_MINIMUM, deps[0]
    import torch

    assert hasattr(torch.optim, "Muon")  # the installed torch meets the bound, too


def test_requires_python_matches_ruff_target() -> None:
    data = pyproject()
    found = re.fullmatch(r">=\s*3\.(\d+)", data["project"]["requires-python"])
    assert found, data["project"]["requires-python"]
    assert data["tool"]["ruff"]["target-version"] == f"py3{found[1]}"


def test_every_package_data_entry_exists() -> None:
    """Each pattern matches at least one file under src/ (setuptools skips missing ones
    silently, so a missing file only shows up as a broken install)."""
    for package, patterns in pyproject()["tool"]["setuptools"]["package-data"].items():
        root = REPO / "src" / package.replace(".", "/")
        for pattern in patterns:
            assert [p for p in root.glob(pattern) if p.is_file()], f"{package}: {pattern} matches nothing"
