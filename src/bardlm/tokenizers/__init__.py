"""Tokenizers: text <-> integer ids.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size` and
`to_dict()`; `load(path)` reads any saved kind back (writing one is `bardlm.io.save_tokenizer`).

| kind | module | what |
| --- | --- | --- |
| char, word | `base.py` | one id per character / per `re.split(r"\\b")` word |
| bpe_scratch, bpe | `bpe.py` | byte-level BPE: readable Python, and the same trained in Rust |
| hf | `hf.py` | any Hugging Face `tokenizer.json` |
| tiktoken | `tiktoken.py` | OpenAI encodings already in tiktoken's cache |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import BardlmError
from .base import CharTokenizer, Tokenizer, WordTokenizer, split_words
from .bpe import BPETokenizer, ScratchBPETokenizer, train_bpe, train_bpe_iter, train_bpe_scratch
from .hf import HFTokenizer
from .tiktoken import TiktokenTokenizer, load_tiktoken

# Kinds that `load` can rebuild from their JSON, by the "kind" field.
KINDS: dict[str, Any] = {
    "char": CharTokenizer, "word": WordTokenizer, "bpe": BPETokenizer,
    "bpe_scratch": ScratchBPETokenizer, "tiktoken": TiktokenTokenizer,
}


def load(path: str | Path) -> Tokenizer:
    """Load any tokenizer this library saved (or a Hugging Face `tokenizer.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise BardlmError(f"tokenizer file {path} not found; pass the path of a tokenizer.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BardlmError(f"tokenizer file {path} is not valid JSON ({e}); re-save it") from None
    return from_dict(data, path)


def from_dict(data: dict[str, Any], path: Path | None = None) -> Tokenizer:
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind in KINDS:
        return KINDS[kind].from_dict(data)
    if isinstance(data, dict) and "model" in data and "pre_tokenizer" in data:
        return HFTokenizer.from_file(path) if path else HFTokenizer.from_json(data)
    raise BardlmError(
        f"tokenizer {path or ''} has unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
    )


def build(spec: str, text: str) -> Tokenizer:
    """A tokenizer from a spec: "char", "word", "word:MIN_COUNT", "bpe:VOCAB" or a saved file."""
    name, _, arg = spec.partition(":")
    if name in ("char", "word", "bpe") and arg and not arg.isdigit():
        raise BardlmError(f"tokenizer {spec!r}: {arg!r} is not a whole number; e.g. {name}:4096")
    if name == "char":
        return CharTokenizer.train(text)
    if name == "word":
        return WordTokenizer.train(text, min_count=int(arg) if arg else 1)
    if name == "bpe":
        return train_bpe(text, vocab_size=int(arg) if arg else 4096)
    if Path(spec).exists():
        return load(spec)
    raise BardlmError(
        f"unknown tokenizer {spec!r}; use char, word, word:MIN_COUNT, bpe:VOCAB or a tokenizer.json path"
    )


__all__ = [
    "KINDS", "BPETokenizer", "CharTokenizer", "HFTokenizer", "ScratchBPETokenizer",
    "TiktokenTokenizer", "Tokenizer", "WordTokenizer", "build", "from_dict", "load",
    "load_tiktoken", "split_words", "train_bpe", "train_bpe_iter", "train_bpe_scratch",
]
