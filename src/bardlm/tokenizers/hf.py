"""Any Hugging Face `tokenizer.json`, behind the bardlm tokenizer protocol (kind "hf")."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BardlmError
from .base import check_ids, first_line, utf8

# Long texts are encoded by the Rust tokenizer in chunks of about this many characters, split only
# where pre-tokenization cannot change: between "x\n" and "y" with x, y visible ASCII characters.
_CHUNK_CHARS = 1 << 16
_SAFE_SPLIT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


def hf_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise BardlmError(
            "BPE and tokenizer.json files need Hugging Face tokenizers; pip install tokenizers"
        ) from None
    return tokenizers


class HFTokenizer:
    """Any Hugging Face `tokenizer.json`, behind the bardlm tokenizer protocol.

    `encode` adds no special tokens (no BOS/EOS templates) and `decode` keeps special tokens, so
    that decode(encode(text)) gives the text back whenever the tokenizer can represent it.
    `to_dict` returns the tokenizer.json itself, so a saved HFTokenizer is a valid tokenizer.json.

    Generation reads three more facts, which a model directory's tokenizer_config.json and
    generation_config.json give (`bardlm.io.hf.load_hf_tokenizer`); a bare tokenizer.json has
    none of them:
      bos_id   the beginning-of-sequence id, or None;
      add_bos  whether a prompt starts with bos_id (Llama: yes; GPT-2, Qwen: no);
      eos_ids  ids that end a generation (Llama 3 instruct has three).
    """

    kind = "hf"

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        self._chunked = _is_plain_byte_level(json.loads(tokenizer.to_str()))
        self.bos_id: int | None = None
        self.add_bos = False
        self.eos_ids: tuple[int, ...] = ()

    def set_special_tokens(
        self, bos_id: int | None = None, add_bos: bool = False, eos_ids: tuple[int, ...] = ()
    ) -> None:
        """Set bos_id, add_bos and eos_ids (see the class docstring)."""
        if add_bos and (bos_id is None or not 0 <= bos_id < self.vocab_size):
            raise BardlmError(
                f"add_bos needs a BOS id in the vocabulary of {self.vocab_size}, got {bos_id}; "
                "fix bos_token in tokenizer_config.json"
            )
        self.bos_id, self.add_bos, self.eos_ids = bos_id, add_bos, tuple(dict.fromkeys(eos_ids))

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary string (e.g. "<s>"), or None when it is not in the vocabulary."""
        return self.hf.token_to_id(token)

    def template_prefix(self) -> list[int]:
        """Ids the tokenizer.json post-processor puts before a text (Llama 3: [<|begin_of_text|>])."""
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start])
        return []

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        path = Path(path)
        try:
            return cls(hf_tokenizers().Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception
            raise BardlmError(
                f"{path} is not a Hugging Face tokenizer.json this tokenizers version can read "
                f"({first_line(e)}); re-save it with tokenizers.Tokenizer.save"
            ) from None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HFTokenizer:
        try:
            return cls(hf_tokenizers().Tokenizer.from_str(json.dumps(data)))
        except Exception as e:
            raise BardlmError(
                f"not a valid Hugging Face tokenizer.json ({first_line(e)}); "
                "re-save it with tokenizers.Tokenizer.save"
            ) from None

    from_dict = from_json  # `tokenizers.from_dict` rebuilds saved kinds with `from_dict`

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        if self._chunked and len(text) > 2 * _CHUNK_CHARS:
            ids: list[int] = []
            pieces = list(chunks(text))
            for start in range(0, len(pieces), 16):  # bounded memory, parallel within a batch
                batch = self.hf.encode_batch_fast(
                    pieces[start : start + 16], add_special_tokens=False
                )
                for enc in batch:
                    ids.extend(enc.ids)
            return ids
        try:
            return list(self.hf.encode(text, add_special_tokens=False).ids)
        except TypeError:
            utf8(text)  # lone surrogates are the usual cause: say so
            raise

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        check_ids(ids, self.vocab_size)
        return str(self.hf.decode(ids, skip_special_tokens=False))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.hf.to_str())

    def token(self, i: int) -> str | None:
        """The vocabulary string of id i (byte symbols for byte-level BPE)."""
        return self.hf.id_to_token(i)


def _is_plain_byte_level(data: dict[str, Any]) -> bool:
    """Whether text can be cut at `_SAFE_SPLIT` points without changing the ids."""
    pre = data.get("pre_tokenizer") or {}
    return (
        data.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
        # Special tokens (an end-of-document token) are matched before pre-tokenization; one
        # without whitespace never straddles a cut at `_SAFE_SPLIT`, which is after a newline.
        and all(t.get("special") and not any(c.isspace() for c in t.get("content", " "))
                for t in data.get("added_tokens") or [])
    )


def chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Cut text into pieces of about `size` characters at `_SAFE_SPLIT` points."""
    start = 0
    while len(text) - start > 2 * size:
        m = _SAFE_SPLIT.search(text, start + size)
        if m is None:
            break
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


