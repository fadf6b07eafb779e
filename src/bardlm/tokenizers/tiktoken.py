"""tiktoken (OpenAI encodings such as "gpt2"), offline only: kind "tiktoken"."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BardlmError
from .base import check_ids, first_line, utf8

_BLOB = "https://openaipublic.blob.core.windows.net"
_GPT2 = f"{_BLOB}/gpt-2/encodings/main"
_R50K = (
    f"{_BLOB}/encodings/r50k_base.tiktoken",
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
)
_P50K = (
    f"{_BLOB}/encodings/p50k_base.tiktoken",
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
)
_CL100K = (
    f"{_BLOB}/encodings/cl100k_base.tiktoken",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
)
_O200K = (
    f"{_BLOB}/encodings/o200k_base.tiktoken",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
)
# The files (url, sha256) tiktoken 0.x downloads for each encoding; it caches each one under
# sha1(url) in its cache folder and re-downloads a file whose sha256 does not match.
TIKTOKEN_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt2": (
        (f"{_GPT2}/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
        (
            f"{_GPT2}/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
    ),
    "r50k_base": (_R50K,),
    "p50k_base": (_P50K,),
    "p50k_edit": (_P50K,),
    "cl100k_base": (_CL100K,),
    "o200k_base": (_O200K,),
    "o200k_harmony": (_O200K,),
}


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken caches its files (None when caching is disabled with TIKTOKEN_CACHE_DIR="")."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


class TiktokenTokenizer:
    """An OpenAI tiktoken encoding (e.g. "gpt2"), kind "tiktoken"; load it with `load_tiktoken`.

    `encode` treats text such as "<|endoftext|>" as ordinary text, never as a special token.
    """

    kind = "tiktoken"

    def __init__(self, name: str, encoding: Any) -> None:
        self.name = name
        self.encoding = encoding

    @property
    def vocab_size(self) -> int:
        return int(self.encoding.n_vocab)

    def encode(self, text: str) -> list[int]:
        utf8(text)
        return list(self.encoding.encode(text, disallowed_special=()))

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        check_ids(ids, self.vocab_size)
        return str(self.encoding.decode(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TiktokenTokenizer:
        return load_tiktoken(data["name"])


def load_tiktoken(name: str = "gpt2") -> TiktokenTokenizer:
    """A tiktoken encoding whose files are already in tiktoken's cache; never downloads.

    Checks the cache first (TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else
    $TMPDIR/data-gym-cache) and raises BardlmError naming the fix when a file is missing.
    """
    if name not in TIKTOKEN_FILES:
        raise BardlmError(
            f"unknown tiktoken encoding {name!r}; use one of {', '.join(TIKTOKEN_FILES)}"
        )
    cache = tiktoken_cache_dir()
    if cache is None:
        raise BardlmError(
            "TIKTOKEN_CACHE_DIR is empty, which makes tiktoken download every time; point it at "
            "a folder holding tiktoken's cached files"
        )
    missing = [url for url, sha256 in TIKTOKEN_FILES[name] if not _cached_ok(cache, url, sha256)]
    if missing:
        raise BardlmError(
            f"tiktoken encoding {name!r} is not cached in {cache} (missing or corrupt: "
            f'{missing[0]}); on a machine with internet run python -c "import tiktoken; '
            f"tiktoken.get_encoding('{name}')\" and copy its cache folder here, or set "
            "TIKTOKEN_CACHE_DIR to a folder that has the files"
        )
    try:
        import tiktoken
    except ImportError:
        raise BardlmError(
            f"tiktoken encoding {name!r} needs tiktoken; pip install tiktoken"
        ) from None
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as e:  # e.g. a corrupt cached file that tiktoken would try to re-download
        raise BardlmError(
            f"tiktoken could not load {name!r} from {cache} ({first_line(e)}); delete the "
            "cached files and fetch them again on a machine with internet"
        ) from None
    return TiktokenTokenizer(name, encoding)


def _cached_ok(cache: Path, url: str, sha256: str) -> bool:
    """Whether tiktoken's cache holds the file for url, intact (so tiktoken will not download)."""
    path = cache / hashlib.sha1(url.encode()).hexdigest()
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256

