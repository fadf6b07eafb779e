"""From a pretrained model to an assistant, measured: a synthetic instruction task.

The task: the user writes "shout WORD" (WORD: 3 to 6 random lowercase letters) and the assistant
answers WORD in capitals. A model pretrained on Shakespeare has never seen it (it continues
the text instead), so its held-out exact-match accuracy is ~0 before finetuning. We finetune it
on training conversations (full, and LoRA) and score conversations whose words it never saw:
each answer, decoded greedily up to the end of the turn, must equal the capitalised word.

`run_assistant_demo` does the whole chain (pretrain -> data -> finetune full -> LoRA ->
scores); docs/benchmarks.md reports a bigger run, tests/test_sft.py a small one.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from ..config import ModelConfig, TrainConfig
from ..io.load import load
from ..tokenizers import CharTokenizer
from ..train.sft import Finetuner, LoRASpec, exact_match, read_chat_jsonl
from ..train.trainer import Trainer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def shout_task(n: int, seed: int, avoid: set[str] = frozenset(), letters: str = LETTERS,
               lengths: tuple[int, int] = (3, 6)) -> list[dict[str, Any]]:
    """n conversations {"messages": [user "shout w", assistant "W"]}, words not in `avoid`
    (of `letters`, lengths in [lo, hi])."""
    rng = random.Random(seed)
    rows, seen = [], set(avoid)
    while len(rows) < n:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(*lengths)))
        if w in seen:
            continue
        seen.add(w)
        rows.append({"messages": [{"role": "user", "content": f"shout {w}"},
                                  {"role": "assistant", "content": w.upper()}]})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_assistant_demo(out: str | Path, text: str, model: dict[str, Any], pretrain: dict[str, Any],
                       full: dict[str, Any], lora: dict[str, Any], lora_rank: int = 8,
                       n_train: int = 2000, n_test: int = 200, letters: str = LETTERS,
                       lengths: tuple[int, int] = (3, 6), log: Any = print) -> dict[str, Any]:
    """Pretrain on `text` (a char model of shape `model`), then finetune full and with LoRA.
    pretrain/full/lora: TrainConfig fields of each stage. Returns accuracies, sizes and times."""
    out = Path(out)
    tok = CharTokenizer.train(text)
    t0 = time.time()
    trainer = Trainer(ModelConfig(**model), TrainConfig(**pretrain), tok, text, out / "pretrained",
                      progress=False, log=log)
    trainer.fit()
    times = {"pretrain_s": time.time() - t0}
    train_rows = shout_task(n_train, 1, set(), letters, lengths)
    words = {r["messages"][1]["content"].lower() for r in train_rows}
    write_jsonl(train_rows, out / "train.jsonl")
    test_rows = shout_task(n_test, 2, words, letters, lengths)  # words never seen in training
    test = read_chat_jsonl(write_jsonl(test_rows, out / "test.jsonl"))
    base, base_tok = load(out / "pretrained")
    from ..io.metadata import template_for

    result: dict[str, Any] = {"before": exact_match(base, base_tok, template_for(out / "pretrained", base_tok), test)}
    for name, cfg, rank in (("full", full, None), ("lora", lora, lora_rank)):
        r = finetune_and_score(out, name, cfg, rank, test, log)
        times[f"{name}_s"] = r.pop("s")
        result.update({name: r.pop("exact_match")}, **{f"{name}_{k}": v for k, v in r.items()})
        log(f"{name}: exact match {result[name]:.3f} ({r['trainable']:,} of {r['total']:,} parameters trained)")
    result.update({k: round(v, 1) for k, v in times.items()}, n_train=n_train, n_test=n_test,
                  letters=letters, lengths=list(lengths))
    (out / "assistant.json").write_text(json.dumps(result, indent=2))
    return result


def finetune_and_score(out: Path, name: str, cfg: dict[str, Any], lora_rank: int | None,
                       test: list, log: Any = print, base_dtype: str = "fp32") -> dict[str, Any]:
    """Finetune out/pretrained on out/train.jsonl into out/NAME (LoRA of rank `lora_rank`,
    alpha 2 x rank, over a `base_dtype` base: int8/int4 is QLoRA; or the whole model when
    None); score exact match on `test`."""
    t0 = time.time()
    spec = None if lora_rank is None else LoRASpec(lora_rank, 2.0 * lora_rank, base_dtype=base_dtype)
    ft = Finetuner(out / "pretrained", out / "train.jsonl", out / name, TrainConfig(**cfg), spec, log=log)
    start = ft.val_loss()
    ft.fit()
    ft.model.eval()
    return {"exact_match": exact_match(ft.model, ft.tokenizer, ft.template, test), "val_loss_start": start,
            "val_loss": ft.history[-1]["val_loss"], "trainable": ft.trainable, "total": ft.total,
            "s": time.time() - t0}
