"""Tokenizers: text <-> integer ids.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, and
`to_dict()`; `save(tok, path)` writes JSON and `load(path)` reads any saved kind back.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from .errors import BardlmError


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One id per distinct character of the training text (sorted, so the ids are stable)."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        if not text:
            raise BardlmError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in self.stoi)
            raise BardlmError(
                f"character {text[pos]!r} at position {pos} is not in the vocabulary "
                f"({self.vocab_size} characters from the training text); remove or replace it"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        return cls(data["chars"])


def split_words(text: str) -> list[str]:
    """Words, spaces and punctuation as separate tokens: `re.split(r"\\b", text)`, empties dropped."""
    return [t for t in re.split(r"\b", text) if t]


class WordTokenizer:
    """Word-level tokens from `split_words`; rare words map to `<unk>` (id 0)."""

    kind = "word"
    UNK = "<unk>"

    def __init__(self, words: list[str]) -> None:
        if not words or words[0] != self.UNK:
            words = [self.UNK, *[w for w in words if w != self.UNK]]
        self.words = words
        self.stoi = {w: i for i, w in enumerate(words)}

    @classmethod
    def train(cls, text: str, min_count: int = 1, max_vocab: int | None = None) -> WordTokenizer:
        """Vocabulary of words seen at least `min_count` times, most frequent first."""
        counts = Counter(split_words(text))
        if not counts:
            raise BardlmError("cannot build a word vocabulary from empty text")
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            ranked = ranked[: max_vocab - 1]
        return cls([cls.UNK, *ranked])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Ids of the words in text; unknown words become <unk>, or an error when `strict`."""
        ids = []
        pos = 0
        for w in split_words(text):
            i = self.stoi.get(w)
            if i is None:
                if strict:
                    raise BardlmError(
                        f"word {w!r} at character {pos} is not in the vocabulary; "
                        "rephrase the text with known words"
                    )
                i = 0
            ids.append(i)
            pos += len(w)
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": self.words}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordTokenizer:
        return cls(data["words"])


# Kinds that `load` can rebuild from their JSON, by the "kind" field.
KINDS: dict[str, Any] = {"char": CharTokenizer, "word": WordTokenizer}
# Byte-level BPE kinds (bpe.py imports `tokenizers`, `regex`, `tiktoken` only when used).
from .bpe import BPETokenizer, ScratchBPETokenizer, TiktokenTokenizer  # noqa: E402

KINDS.update(bpe=BPETokenizer, bpe_scratch=ScratchBPETokenizer, tiktoken=TiktokenTokenizer)


def save(tok: Tokenizer, path: str | Path) -> None:
    """Write the tokenizer as JSON (atomically)."""
    from .checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(tok.to_dict(), ensure_ascii=False))


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
        from .bpe import HFTokenizer  # a Hugging Face tokenizer.json

        return HFTokenizer.from_file(path) if path else HFTokenizer.from_json(data)
    raise BardlmError(
        f"tokenizer {path or ''} has unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
    )


def build(spec: str, text: str) -> Tokenizer:
    """A tokenizer from a spec: "char", "word", "word:MIN_COUNT", "bpe:VOCAB" or a saved file."""
    name, _, arg = spec.partition(":")
    if name == "char":
        return CharTokenizer.train(text)
    if name == "word":
        return WordTokenizer.train(text, min_count=int(arg) if arg else 1)
    if name == "bpe":
        from .bpe import train_bpe

        return train_bpe(text, vocab_size=int(arg) if arg else 4096)
    if Path(spec).exists():
        return load(spec)
    raise BardlmError(
        f"unknown tokenizer {spec!r}; use char, word, word:MIN_COUNT, bpe:VOCAB or a tokenizer.json path"
    )
