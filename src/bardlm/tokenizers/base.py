"""The tokenizer protocol, the character and word tokenizers, and checks every kind shares.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, and
`to_dict()`; `save(tok, path)` writes JSON and `load(path)` reads any saved kind back.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Protocol

from ..errors import BardlmError


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
        return cls.from_counts(Counter(split_words(text)), min_count, max_vocab)

    @classmethod
    def from_counts(cls, counts: Counter[str], min_count: int = 1, max_vocab: int | None = None) -> WordTokenizer:
        """`train` from word counts already made (e.g. summed over the pieces of a corpus)."""
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


def utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BardlmError(
            f"text has a lone surrogate {text[e.start]!r} at position {e.start}, which is not "
            "valid Unicode; read the text with errors='replace'"
        ) from None


def check_ids(ids: list[int], vocab_size: int) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise BardlmError(
            f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}); decode ids made "
            "by this tokenizer"
        )


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]

