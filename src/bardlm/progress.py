"""The progress display of long jobs (train, finetune, prepare, eval, lm-eval): a tqdm bar on
stderr, shown only when asked for (no `--no-progress`) and when stderr is a terminal, so logs
and pipes get plain lines only."""

from __future__ import annotations

import sys
from typing import Any


def show_progress(wanted: bool = True) -> bool:
    """Whether to draw a bar: wanted, and stderr is a terminal."""
    return wanted and sys.stderr.isatty()


def progress_bar(wanted: bool, total: int | None, desc: str, unit: str = "step", initial: int = 0) -> Any:
    """A tqdm bar on stderr, or None where `show_progress(wanted)` says no."""
    if not show_progress(wanted):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
