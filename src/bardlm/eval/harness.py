"""lm-evaluation-harness for bardlm models: `BardlmLM`, registered as model "bardlm".

    pip install "bardlm[eval]"
    bardlm lm-eval --ckpt DIR --tasks hellaswag --limit 100
    lm_eval.simple_evaluate(model=BardlmLM(ckpt="DIR"), tasks=[...])   # from Python

The harness asks three questions of a model, in text; every tokenizer bardlm reads (char, word,
BPE, Hugging Face, tiktoken) answers them through token ids:

  loglikelihood(context, continuation) -> (log P(continuation | context), was it greedy)
  loglikelihood_rolling(text)          -> log P(text), in windows of the context length
  generate_until(context, until=...)   -> greedy text up to a stop string

The context/continuation split follows the harness's Hugging Face model (`--model hf`), so the
two score a converted model alike: trailing spaces of the context move to the continuation, the
whole text is encoded once and the continuation is what follows the context's tokens. Where the
tokens of `context` are not a prefix of those of `context + continuation` (a word tokenizer
merging the two sides into one token, say), the continuation is every token from the first
one that differs: a token holding any continuation text is scored, none is scored twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import BardlmError
from ..infer.generate import generate_text
from ..io.load import load
from ..progress import progress_bar
from ..tokenizers import WordTokenizer, split_words
from .score import score_rows

try:
    import lm_eval.models  # noqa: F401  (the built-in models first: the registry fills itself
    from lm_eval.api.model import LM  # only while it is empty, so ours must not come first)
    from lm_eval.api.registry import register_model
except ImportError as e:  # the harness is an optional extra
    raise BardlmError(
        "lm-evaluation-harness is not installed; pip install 'bardlm[eval]' (or lm-eval)"
    ) from e


def split_tokens(context_ids: list, whole_ids: list) -> int:
    """How many leading tokens of `whole_ids` are context: the common prefix with the context's
    own tokens (all of them, when tokenizing the two together changes nothing at the seam)."""
    n = 0
    for a, b in zip(context_ids, whole_ids):
        if a != b:
            break
        n += 1
    return min(n, len(whole_ids) - 1)  # the continuation keeps at least one token


def prefix_token_of(path: str | Path) -> int | None:
    """The token a text is conditioned on when it has no context (the harness's `prefix_token_id`):
    a Hugging Face directory's bos_token_id, else its eos_token_id; None for bardlm runs, whose
    char/word/BPE vocabularies have no such token (the first token then goes unscored)."""
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if "model" in data:  # a bardlm run's config.json
        return None
    for key in ("bos_token_id", "eos_token_id"):
        value = data.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


@register_model("bardlm")
class BardlmLM(LM):
    """An lm-evaluation-harness model over any directory `bardlm.load` reads.

    Arguments (also as `--model_args ckpt=DIR,batch_size=8,...`): ckpt (or pretrained), dtype,
    device, batch_size, max_length (tokens a forward pass reads; default the context),
    prefix_token_id (default `prefix_token_of(ckpt)`), max_gen_toks.
    """

    def __init__(self, ckpt: str | None = None, pretrained: str | None = None,
                 dtype: str | None = None, device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | str | None = None, prefix_token_id: int | str | None = None,
                 max_gen_toks: int | str = 256, progress: bool = False, **_ignored: Any) -> None:
        super().__init__()
        path = ckpt or pretrained
        if path is None:
            raise BardlmError("the bardlm model needs ckpt=DIR (a bardlm, INT8 or Hugging Face directory)")
        self.model, self.tokenizer = load(path, dtype, device)
        if self.tokenizer is None:
            raise BardlmError(f"{path} has no tokenizer.json; the harness needs text -> ids")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_length = int(max_length) if max_length else self.model.config.block_size
        self.progress = progress  # a bar of rows scored (`bardlm.progress`), unless the harness says no
        if not 1 <= self.max_length <= self.model.config.block_size:
            raise BardlmError(f"max_length must be 1..{self.model.config.block_size}, got {max_length}")
        given = prefix_token_id not in (None, "", "None")
        self.prefix = int(prefix_token_id) if given else prefix_token_of(path)  # type: ignore[arg-type]
        self.max_gen_toks = int(max_gen_toks)

    # Tokens ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of text; a word outside a word vocabulary becomes <unk> (tasks are not ours to
        rephrase), a character outside a char vocabulary is an error naming it."""
        return self.tokenizer.encode(text)

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the harness's Hugging Face model splits them."""
        if not context:
            cont = self.encode(continuation)
            if self.prefix is not None and (not cont or cont[0] != self.prefix):
                return [self.prefix], cont
            return cont[:1], cont[1:]  # no prefix token: the first token is context
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        if isinstance(self.tokenizer, WordTokenizer):  # compare words: two <unk> may differ
            n = split_tokens(split_words(context), split_words(context + continuation))
        else:
            n = split_tokens(self.encode(context), whole)
        return whole[:n], whole[n:]

    # The three requests ----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows, starts = [], []
        for req in requests:
            ctx, cont = self.pair(*req.args)
            if not cont:
                raise BardlmError(f"continuation {req.args[1]!r} has no tokens of its own")
            row = (ctx + cont)[-(self.max_length + 1):]  # crop the context on the left, like hf
            rows.append(row)
            starts.append(len(row) - len(cont))
        scored = score_rows(self.model, rows, starts, self.batch_size, self._bar("loglikelihood", disable_tqdm))
        return [(s.total, bool(s.greedy.all())) for s in scored]

    def _bar(self, label: str, disable_tqdm: bool) -> str | None:
        return label if self.progress and not disable_tqdm else None

    def rolling_rows(self, ids: list[int]) -> tuple[list[list[int]], list[int]]:
        """Rows scoring every token of `ids` once, each with as much context as fits: the
        harness's disjoint rolling windows. The prefix token (if any) conditions the first."""
        seq = ([self.prefix] if self.prefix is not None else []) + ids
        L, rows, starts = self.max_length, [], []
        done = 1  # seq[0] is never scored: the prefix token, or the text's first token
        while done < len(seq):
            end = min(done + L, len(seq))
            begin = max(0, end - L - 1)
            rows.append(seq[begin:end])
            starts.append(done - begin)
            done = end
        return rows, starts

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        rows, starts, owner = [], [], []
        for i, req in enumerate(requests):
            r, s = self.rolling_rows(self.encode(req.args[0]))
            rows += r
            starts += s
            owner += [i] * len(r)
        totals = [0.0] * len(requests)
        bar = self._bar("loglikelihood_rolling", disable_tqdm)
        for i, s in zip(owner, score_rows(self.model, rows, starts, self.batch_size, bar)):
            totals[i] += s.total
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        bar = progress_bar(self.progress and not disable_tqdm, len(requests), "generate_until", unit="request")
        for req in requests:
            if bar is not None:
                bar.update(1)
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_ctx = len(self.encode(context))
            room = self.model.config.block_size - n_ctx
            max_new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), max(room, 0))
            if max_new <= 0:
                out.append("")
                continue
            out.append(generate_text(self.model, self.tokenizer, context, max_new_tokens=max_new,
                                     stop=until, temperature=0.0))
        if bar is not None:
            bar.close()
        return out


def run_harness(ckpt: str, tasks: list[str], include_path: str | None = None,
                limit: float | None = None, batch_size: int = 8, progress: bool = False,
                **model_args: Any) -> dict[str, Any]:
    """Evaluate a model directory on lm-eval tasks; returns {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = BardlmLM(ckpt=ckpt, batch_size=batch_size, progress=progress, **model_args)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                              log_samples=False)
    if results is None:
        raise BardlmError("lm-eval returned no results")
    return {task: {k: v for k, v in metrics.items() if k != "alias"}
            for task, metrics in results["results"].items()}
