"""Byte-level BPE: a small from-scratch implementation and the fast Hugging Face-backed one.

Byte-level byte-pair encoding (the GPT-2 tokenizer) works in three steps:

1. **Pre-tokenize**: split the text into "words" with the GPT-2 regex (`PRETOKENIZE_PATTERN`):
   runs of letters with an optional leading space, runs of digits, runs of punctuation,
   whitespace, and English contractions. Merges never cross a word boundary.
2. **Bytes as symbols**: each word becomes its UTF-8 bytes. Every byte is drawn as one printable
   character (`bytes_to_unicode`, so the space byte is "Ġ"), which lets tokens be plain strings.
   The 256 byte symbols are the base vocabulary, so *every* string can be encoded: a character
   never seen in training just falls back to its bytes.
3. **Merges**: training repeatedly finds the most frequent adjacent pair of symbols (counted over
   the words, weighted by how often each word occurs) and merges it into a new symbol. Encoding a
   word replays the learnt merges, earliest-learnt first.

This module has:

- `train_bpe_scratch` / `ScratchBPETokenizer`: the algorithm above in readable pure Python. It
  learns exactly the merges of the Hugging Face `tokenizers` BpeTrainer (same tie-break) and
  gives the same ids; it is slow, so use it to learn how BPE works, not to train.
- `train_bpe` / `BPETokenizer` (kind "bpe"): the same tokenizer trained by Hugging Face
  `tokenizers` in Rust, a few seconds for the complete works of Shakespeare.

Any Hugging Face `tokenizer.json` is `hf.HFTokenizer`; OpenAI encodings are `tiktoken.py`.
Pre-tokenization uses the `regex` package, which understands the `\\p{L}` / `\\p{N}` Unicode
classes of the GPT-2 pattern (Python's `re` does not).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise
from typing import Any

from ..errors import BardlmError
from .base import check_ids, utf8
from .hf import HFTokenizer, chunks, hf_tokenizers

# The pre-tokenization pattern of GPT-2 (and of the `tokenizers` ByteLevel pre-tokenizer).
PRETOKENIZE_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------------------------
# Building blocks: bytes <-> printable characters, pre-tokenization
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte 0-255 to one printable Unicode character.

    Printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") map to themselves; the other 68 bytes
    (controls, space, ...) map to chr(256), chr(257), ... in byte order, so space becomes "Ġ"
    and newline "Ċ". The dict is in *alphabet order*: printable bytes first, then the others;
    that is also the order of the characters' code points, and the order of the base ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """The 256 byte symbols in id order (ids 0-255), as the HF trainer numbers them."""
    return tuple(sorted(bytes_to_unicode().values()))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _pretokenize_regex() -> Any:
    try:
        import regex
    except ImportError:
        raise BardlmError(
            "byte-level BPE needs the `regex` package for \\p{L} in its pattern; pip install regex"
        ) from None
    return regex.compile(PRETOKENIZE_PATTERN)


def pretokenize(text: str) -> list[str]:
    """Split text into GPT-2 words; merges never cross these boundaries.

    >>> pretokenize("Hello world's 42!!\\n")
    ['Hello', ' world', "'s", ' 42', '!!', '\\n']
    """
    return _pretokenize_regex().findall(text)


def to_byte_symbols(word: str) -> str:
    """A word as its UTF-8 bytes, one printable character per byte: " é" -> "ĠÃ©"."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in utf8(word))


def from_byte_symbols(symbols: str) -> str:
    """Inverse of `to_byte_symbols`; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD."""
    table = _byte_decoder()
    return bytes(table[c] for c in symbols).decode("utf-8", errors="replace")



def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise BardlmError(
            f"BPE vocab_size {vocab_size!r} is smaller than the 256 byte tokens; use 256 or more "
            "(e.g. bpe:4096)"
        )


# --------------------------------------------------------------------------------------------
# From scratch: training and encoding in plain Python
# --------------------------------------------------------------------------------------------


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every occurrence of the pair (a, b) in word by `new`, left to right."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe_scratch(text: str, vocab_size: int) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges from text until the vocabulary has `vocab_size` tokens.

    Returns the merges in the order learnt, each a pair of byte-symbol strings such as
    ("Ġ", "t"). The result is the same as Hugging Face's BpeTrainer: the most frequent pair wins,
    and among equally frequent pairs the one with the smallest (left id, right id), where the
    ids are the 256 bytes in `byte_alphabet` order and then the merged tokens in creation order.
    Training stops early when no pair is left (every word is a single token).
    """
    _check_vocab_size(vocab_size)
    word_counts = Counter(to_byte_symbols(w) for w in pretokenize(text))

    tokens = list(byte_alphabet())  # id -> token string
    ids = {t: i for i, t in enumerate(tokens)}  # token string -> id
    words = [[ids[c] for c in w] for w in word_counts]  # each distinct word as token ids
    counts = list(word_counts.values())

    # How often each adjacent pair occurs, and in which words (so a merge only revisits those).
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)

    def count(w: int, sign: int) -> None:
        word, n = words[w], counts[w] * sign
        for pair in pairwise(word):
            pair_counts[pair] += n
            if sign > 0:
                where[pair].add(w)
            elif pair_counts[pair] == 0:
                del pair_counts[pair]

    for w in range(len(words)):
        count(w, +1)

    merges: list[tuple[str, str]] = []
    while len(ids) < vocab_size and pair_counts:
        top = max(pair_counts.values())
        a, b = min(pair for pair, c in pair_counts.items() if c == top)
        new_token = tokens[a] + tokens[b]
        if new_token not in ids:  # two merge paths can build the same string: keep one id
            ids[new_token] = len(tokens)
            tokens.append(new_token)
        new = ids[new_token]
        merges.append((tokens[a], tokens[b]))
        for w in where.pop((a, b)):
            count(w, -1)
            words[w] = _merge_word(words[w], a, b, new)
            count(w, +1)
    return merges


class ScratchBPETokenizer:
    """Byte-level BPE encoder/decoder in plain Python, from a list of merges.

    Token ids: the 256 byte symbols in `byte_alphabet` order, then each merge's result in merge
    order (a string made twice keeps its first id) -- the numbering of the HF trainer, so a
    tokenizer built from `BPETokenizer.merges()` gives the same ids as that `BPETokenizer`.
    """

    kind = "bpe_scratch"

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self.merges = [(a, b) for a, b in merges]
        self.tokens = list(byte_alphabet())
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        for a, b in self.merges:
            if a not in self.ids or b not in self.ids:
                raise BardlmError(
                    f"BPE merge ({a!r}, {b!r}) uses a token that no earlier merge made; "
                    "the merges are corrupt or out of order, re-train the tokenizer"
                )
            if a + b not in self.ids:
                self.ids[a + b] = len(self.tokens)
                self.tokens.append(a + b)
        # Rank of each merge: lower merges first. A repeated pair keeps its last rank, as in HF.
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int) -> ScratchBPETokenizer:
        return cls(train_bpe_scratch(text, vocab_size))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode_word(self, symbols: str) -> list[int]:
        """Token ids for one pre-tokenized word, given as byte symbols.

        Repeatedly merges the adjacent pair with the lowest rank (the leftmost if it occurs
        more than once) until no learnt merge applies -- the order HF's BPE model uses.
        """
        cached = self._cache.get(symbols)
        if cached is not None:
            return cached
        parts = list(symbols)
        never = len(self.merges)  # rank of a pair that no merge joins
        while len(parts) > 1:
            rank, i = min(
                (self.ranks.get(pair, never), i) for i, pair in enumerate(pairwise(parts))
            )
            if rank == never:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids = [self.ids[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[symbols] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        utf8(text)  # a clear error for text that is not valid Unicode
        out: list[int] = []
        for word in pretokenize(text):
            out.extend(self.encode_word(to_byte_symbols(word)))
        return out

    def decode(self, ids: list[int]) -> str:
        check_ids(ids, self.vocab_size)
        return from_byte_symbols("".join(self.tokens[i] for i in ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScratchBPETokenizer:
        return cls([tuple(m) for m in data["merges"]])



class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained by `train_bpe` (Hugging Face `tokenizers` inside), kind "bpe".

    Saved as {"kind": "bpe", "tokenizer": <the tokenizer.json>}.
    """

    kind = "bpe"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": json.loads(self.hf.to_str())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        tok = HFTokenizer.from_json(data["tokenizer"])
        return cls(tok.hf)

    def merges(self) -> list[tuple[str, str]]:
        """The learnt merges in order, as pairs of byte-symbol strings."""
        raw = json.loads(self.hf.to_str())["model"]["merges"]
        # tokenizers >= 0.20 writes [a, b] pairs; older versions wrote "a b" strings.
        return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw]


def byte_level_bpe(
    vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None
) -> Any:
    """An untrained HF tokenizer set up for GPT-2-style byte-level BPE (no special tokens)."""
    hf = hf_tokenizers()
    model = hf.models.BPE(vocab, merges) if vocab is not None else hf.models.BPE()
    tok = hf.Tokenizer(model)
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = hf.decoders.ByteLevel()
    return tok


def train_bpe(text: str, vocab_size: int = 4096) -> BPETokenizer:
    """Train byte-level BPE on text with Hugging Face `tokenizers`: `vocab_size` tokens at most.

    The 256 bytes are always in the vocabulary (so any string can be encoded), then learnt merges
    until the vocabulary is full or no pair is left. Same merges as `train_bpe_scratch`.
    """
    if not text:
        raise BardlmError("cannot train BPE on empty text; pass the training corpus")
    utf8(text)
    # Fed in chunks cut where pre-tokenization cannot change, so the word counts are exactly those
    # of the whole text (as in train_bpe_scratch), with far less memory than one 5 MB sequence.
    return train_bpe_iter(chunks(text), vocab_size)


def train_bpe_iter(pieces: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
    """`train_bpe` on a stream of text pieces, each cut where pre-tokenization cannot change
    (e.g. by `chunks`): the trainer keeps word counts only, so a corpus of any size streams
    through without being held whole (`bardlm prepare` feeds it a sample of its sources)."""
    _check_vocab_size(vocab_size)
    hf = hf_tokenizers()
    tok = byte_level_bpe()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer=trainer)
    return BPETokenizer(tok)


def chars_per_token(tok: Any, text: str) -> float:
    """Average characters per token of `tok` on text: higher is better compression."""
    n = len(tok.encode(text))
    return len(text) / n if n else 0.0


