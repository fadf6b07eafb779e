"""Evaluation: perplexity and bits per byte on any text, and lm-evaluation-harness.

| module | what |
| --- | --- |
| `score.py` | log-probabilities of given tokens, batched: the primitive everything scores with |
| `perplexity.py` | sliding-window perplexity (the Hugging Face guide's windows), bits per byte |
| `harness.py` | a model class for lm-evaluation-harness (`--model bardlm`), and `run_harness` |

It sits above `infer/`, `io/` and `train/` and below the command line and the server.
"""

from __future__ import annotations

from .perplexity import PerplexityResult, perplexity, perplexity_of_ids, sliding_windows
from .score import Scored, score_rows

__all__ = ["PerplexityResult", "Scored", "perplexity", "perplexity_of_ids", "score_rows",
           "sliding_windows"]
