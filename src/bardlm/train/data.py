"""Corpora and batches.

`--data` is a text file (plain or gzipped) or a corpus name. Without `--data`, bardlm trains on
tiny Shakespeare, shipped gzipped inside the package (`bardlm/data/tiny_shakespeare.txt.gz`), so
a first run needs neither the network nor a data folder. A corpus name is looked up, in order:
a file of that name in `$BARDLM_DATA_DIR`; the download cache (`$XDG_CACHE_HOME/bardlm`, default
`~/.cache/bardlm`); the embedded copy (tiny-shakespeare only); a download (the complete works
from Project Gutenberg).

`--data DIR` is a folder made by `bardlm prepare` (train/prepare.py): shards of token ids that
`load_prepared` maps from disk (`ShardedIds`), never loading them whole, split by document.

Token ids are cached in `$XDG_CACHE_HOME/bardlm/tokens`, never beside the user's corpus (see
`token_cache_path`).

Batches are non-overlapping windows of block_size + 1 tokens: overlapping windows show the model
the same text many times per epoch and overfit. The order of windows is a pure function of
(seed, epoch), so a step number is all that resuming needs to find its place.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BardlmError
from ..io.atomic import default_mode

# name -> (file name, download URL or None, is it a Project Gutenberg edition whose licence must
# be stripped)
CORPORA: dict[str, tuple[str, str | None, bool]] = {
    "shakespeare": (
        "shakespeare_complete.txt",
        "https://www.gutenberg.org/cache/epub/100/pg100.txt",
        True,
    ),
    # Shipped with the package (EMBEDDED), so never downloaded.
    "tiny-shakespeare": ("tiny_shakespeare.txt", None, False),
}
# name -> gzipped copy inside the package (package data, see pyproject.toml).
EMBEDDED: dict[str, Path] = {
    "tiny-shakespeare": Path(__file__).resolve().parents[1] / "data" / "tiny_shakespeare.txt.gz",
}
DEFAULT_CORPUS = "tiny-shakespeare"  # what `--data` means when it is not given


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bardlm"


def strip_gutenberg(text: str) -> str:
    """The text between the `*** START OF ...` and `*** END OF ...` lines of a Gutenberg eBook."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith("*** START OF")), None)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        return text
    return "".join(lines[start + 1 : end]).strip("\n\r\ufeff ") + "\n"


def download(name: str, timeout: float = 30.0) -> Path:
    """Fetch a named corpus into the cache (atomically); offline, a one-line error naming --data."""
    filename, url, gutenberg = CORPORA[name]
    assert url is not None, f"{name} is embedded, not downloaded"
    dest = cache_dir() / filename
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            raw = resp.read()
    except (urllib.error.URLError, OSError) as e:
        raise BardlmError(
            f"could not download the {name} corpus from {url} ({getattr(e, 'reason', e)}); "
            f"offline, pass --data PATH to a text file or set BARDLM_DATA_DIR to a folder "
            f"holding {filename}"
        ) from None
    text = raw.decode("utf-8-sig")
    if gutenberg:
        text = strip_gutenberg(text)
    from ..io.atomic import atomic_write_text

    atomic_write_text(dest, text)
    return dest


def resolve(data: str | None) -> Path:
    """The file a `--data` argument (a path, a corpus name, or None for DEFAULT_CORPUS) refers to.

    Only the places named in the module docstring are searched: nothing relative to the working
    directory, so a run behaves the same from any folder.
    """
    if data is not None and data not in CORPORA:
        return Path(data)
    name = data or DEFAULT_CORPUS
    filename = CORPORA[name][0]
    candidates = []
    if os.environ.get("BARDLM_DATA_DIR"):
        candidates.append(Path(os.environ["BARDLM_DATA_DIR"]) / filename)
    candidates.append(cache_dir() / filename)
    for path in candidates:
        if path.is_file():
            return path
    if name in EMBEDDED:
        if not EMBEDDED[name].is_file():
            raise BardlmError(
                f"the embedded {name} corpus is missing from this bardlm install "
                f"({EMBEDDED[name]}); reinstall bardlm, or pass --data PATH to a text file"
            )
        return EMBEDDED[name]
    return download(name)


def read_text(path: str | Path) -> str:
    """A corpus file's text, with a clear error for every way it can be unusable."""
    path = Path(path)
    if not path.exists():
        raise BardlmError(f"data file {path} does not exist; check the --data path")
    if path.is_dir():
        raise BardlmError(f"--data {path} is a directory; pass a text file inside it")
    raw = path.read_bytes()
    if path.suffix == ".gz":  # the embedded corpus, or any gzipped text file
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise BardlmError(
                f"data file {path} is not valid gzip; decompress it or pass the plain text file"
            ) from None
    if not raw.strip():
        raise BardlmError(f"data file {path} is empty; pass a file with text in it")
    if b"\x00" in raw[:8192]:
        raise BardlmError(f"data file {path} looks binary (it has NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BardlmError(
            f"data file {path} is not UTF-8 (bad byte at offset {e.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`"
        ) from None


def load_corpus(data: str | None = None) -> tuple[str, Path]:
    path = resolve(data)
    return read_text(path), path


def token_cache_path(corpus: Path, raw: bytes, tokenizer_dict: dict) -> Path:
    """Where the token ids of `corpus` under one tokenizer are cached: `$XDG_CACHE_HOME/bardlm/
    tokens` (default `~/.cache/bardlm/tokens`), never beside the corpus, whose folder is the
    user's (a project, a read-only share) and must not fill with hidden files.

    The name holds a hash of the corpus bytes and the tokenizer's JSON, so editing either gives a
    new file (the old one is simply not used again), and two corpora of one name never collide.
    """
    h = hashlib.sha256(raw)
    h.update(json.dumps(tokenizer_dict, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return cache_dir() / "tokens" / f"{corpus.name}.{h.hexdigest()[:16]}.tokens.npy"


def token_ids(corpus: str | Path, text: str, tokenizer) -> np.ndarray:  # noqa: ANN001
    """The ids of `text` (read from `corpus`) as a read-only memory-mapped array (N,).

    Encoded once and cached (see `token_cache_path`): later runs, and every rank of a torchrun
    job, map the same file instead of re-encoding, and pages are shared between processes.
    uint16 when the vocabulary fits (half the bytes of int32), else int32.
    """
    corpus = Path(corpus)
    path = token_cache_path(corpus, corpus.read_bytes(), tokenizer.to_dict())
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        pass  # not cached yet, or an unreadable or damaged cache file: encode (and replace it)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    ids = np.asarray(tokenizer.encode(text), dtype=dtype)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids)
        default_mode(tmp)  # shared by every user's runs, like the corpus itself
        os.replace(tmp, path)  # atomic: concurrent ranks write the same bytes, one wins
        return np.load(path, mmap_mode="r")
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return ids  # cache folder not writable: still train, just without the cache


@dataclass
class Split:
    """Token ids of one split and how many characters they cover (for bits per character)."""

    ids: np.ndarray
    n_chars: int


def split_ids(ids: np.ndarray, n_chars: int, val_fraction: float = 0.1) -> tuple[Split, Split]:
    """Train/validation split by position: the last `val_fraction` of the tokens validate."""
    n_val = int(len(ids) * val_fraction)
    n_train = len(ids) - n_val
    frac = n_train / max(len(ids), 1)
    return Split(ids[:n_train], round(n_chars * frac)), Split(ids[n_train:], n_chars - round(n_chars * frac))


class Batches:
    """Non-overlapping (x, y) windows of a token array, reshuffled every epoch from a seed.

    Sample number s (counting across epochs) lives in epoch s // n_windows; each epoch picks a
    random start offset in [0, block_size] and a random permutation of its windows. With several
    processes, rank r of w takes samples r, r + w, r + 2w, ... of every global batch.
    """

    def __init__(self, ids: np.ndarray, block_size: int, seed: int = 0) -> None:
        self.ids, self.T, self.seed = ids, block_size, seed
        if len(ids) < block_size + 1:
            raise BardlmError(
                f"the training text has {len(ids)} tokens, fewer than one sequence of "
                f"block_size + 1 = {block_size + 1}; use a longer corpus or a smaller block_size"
            )
        self.n_windows = (len(ids) - block_size) // (block_size + 1)  # leaves room for the offset
        self.n_windows = max(self.n_windows, 1)
        self._epoch, self._perm, self._offset = -1, None, 0

    def _layout(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            slack = len(self.ids) - self.n_windows * (self.T + 1)
            self._offset = int(torch.randint(0, slack + 1, (1,), generator=g))
            self._perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._epoch = epoch

    def window(self, sample: int) -> np.ndarray:
        """Tokens (block_size + 1,) of global sample number `sample`."""
        self._layout(sample // self.n_windows)
        start = self._offset + int(self._perm[sample % self.n_windows]) * (self.T + 1)
        return self.ids[start : start + self.T + 1]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, micro: int = 0, n_micro: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size), of one micro-batch of one rank at one step."""
        first = ((step * n_micro + micro) * world + rank) * batch_size
        rows = np.stack([self.window(first + i) for i in range(batch_size)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def val_windows(ids: np.ndarray, block_size: int) -> torch.Tensor:
    """All non-overlapping validation windows (N, block_size + 1), from the split's start.

    For shards (`ShardedIds`) a `ShardWindows` view of the same rows, read when indexed.
    """
    n = len(ids) // (block_size + 1)  # each window is T + 1 tokens: x = w[:-1], y = w[1:]
    if n == 0:
        raise BardlmError(
            f"the validation split has {len(ids)} tokens, not one full sequence of "
            f"{block_size + 1}; use a longer corpus or a smaller block_size"
        )
    if isinstance(ids, ShardedIds):
        return ShardWindows(ids, block_size, n)  # type: ignore[return-value]
    return torch.from_numpy(ids[: n * (block_size + 1)].astype(np.int64)).view(n, block_size + 1)


# Prepared folders (`bardlm prepare`, train/prepare.py) -----------------------------------------
class ShardedIds:
    """The token ids of several shard files as one read-only sequence (N,), never loaded whole.

    Each shard is a memory map; `ids[a:b]` copies just those tokens (stitched from two shards when
    the range crosses a boundary), so `Batches` and `val_windows` work on it as on one array and
    give the same windows however the corpus was cut into shards. Under torchrun every process
    maps the same files and reads only its own windows; the page cache is shared.
    """

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.maps = [np.memmap(p, dtype=dtype, mode="r", shape=(n,)) for p, n in zip(paths, counts) if n]
        self.starts = np.cumsum([0, *(len(m) for m in self.maps)])  # (n_shards + 1,)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("ShardedIds supports slices only")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise TypeError("ShardedIds supports contiguous slices only")
        parts = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo = int(self.starts[k])
            n = min(stop, int(self.starts[k + 1])) - start
            parts.append(self.maps[k][start - lo : start - lo + n])
            start, k = start + n, k + 1
        if not parts:
            return np.zeros(0, self.dtype)
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)


@dataclass
class Prepared:
    """A folder made by `bardlm prepare`: its meta.json, the two splits and the tokenizer path."""

    path: Path
    meta: dict
    train: Split
    val: Split

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.meta["tokenizer"]

    @property
    def val_bytes(self) -> int:
        return int(self.meta["val_bytes"])

    def fingerprint(self) -> str:
        """Changes whenever the tokens could: the shard list and the tokenizer's size."""
        key = json.dumps([self.meta["shards"], self.meta["vocab_size"], self.meta["dtype"]])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def is_prepared(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "meta.json").is_file()


def load_prepared(path: str | Path) -> Prepared:
    """Open a prepared folder: its shards as memory maps (`ShardedIds`), nothing read yet.

    meta.json is written last (and the folder renamed into place after it), so a folder without
    one is an interrupted or foreign folder, never half a corpus.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise BardlmError(
            f"--data {path} is a folder without meta.json: not made by `bardlm prepare`, or its "
            "prepare was interrupted; run `bardlm prepare --data SOURCES --out DIR` (or pass a "
            "text file)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        shards = {s: [sh for sh in meta["shards"] if sh["split"] == s] for s in ("train", "val")}
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    except (ValueError, KeyError, TypeError) as e:
        raise BardlmError(f"{meta_path} is not a valid prepare meta.json ({e}); prepare again") from None
    splits = {}
    for s, items in shards.items():
        files = [path / sh["file"] for sh in items]
        counts = [int(sh["tokens"]) for sh in items]
        for f, n in zip(files, counts):
            if not f.is_file() or f.stat().st_size != n * dtype.itemsize:
                raise BardlmError(f"shard {f} is missing or not {n} tokens long; prepare {path} again")
        splits[s] = Split(ShardedIds(files, counts, dtype), int(meta[f"{s}_characters"]))  # type: ignore[arg-type]
    return Prepared(path, meta, splits["train"], splits["val"])


class ShardWindows:
    """`val_windows` of shards without loading them: n rows (block_size + 1,) read on demand.

    Supports what evaluation does with the windows tensor: len, a slice of rows (a batch) and a
    LongTensor of row numbers (the evenly spread subset); each returns an int64 tensor (B, T + 1).
    """

    def __init__(self, ids: ShardedIds, block_size: int, n: int) -> None:
        self.ids, self.W, self.n = ids, block_size + 1, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            if step == 1:  # one contiguous read
                rows = self.ids[start * self.W : max(stop, start) * self.W]
                return torch.from_numpy(rows.astype(np.int64)).view(-1, self.W)
            index = list(range(start, stop, step))
        else:
            index = [int(i) for i in key]
        rows = [self.ids[i * self.W : (i + 1) * self.W] for i in index]
        return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.zeros(0, self.W, dtype=torch.long)
