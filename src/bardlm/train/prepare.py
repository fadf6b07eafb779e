"""`bardlm prepare`: turn text of any size into shards of token ids that training memory-maps.

    sources (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet, or folders of them)
      -> documents, streamed as pieces of about 64K characters   (`read_source`)
      -> token ids, encoded in batches on every core             (`Encoder`)
      -> train_00000.bin, ..., val_00000.bin, tokenizer.json, meta.json   (`ShardWriter`, `prepare`)

One document is one text file, one JSONL line or one parquet row. After each document comes an
end-of-document token (`EOS_TOKEN`, or the tokenizer's own), so the model sees where texts end.
Whole documents go to validation (each with probability `val_fraction`, drawn from a seed in
document order); a corpus of one document is split by position instead, as `bardlm train` does
with a text file.

Memory does not grow with the corpus: a source is read in blocks, a document is encoded in pieces
cut where the tokenizer gives the same ids as on the whole text (`cut_points`), and ids go
straight to the shard files. Shards are raw little-endian arrays (uint16 when the vocabulary fits,
else uint32); meta.json lists them with their token counts, so `data.load_prepared` can map them.

The output is written into a temporary folder beside --out and renamed at the very end, so an
interrupted prepare leaves nothing that `bardlm train --data DIR` would read.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import queue
import random
import re
import shutil
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BardlmError
from ..progress import progress_bar
from ..tokenizers import CharTokenizer, Tokenizer, WordTokenizer, build, split_words, train_bpe_iter

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens that existing tokenizers already have (GPT-2, Llama 2, Llama 3, Gemma,
# Qwen chat); the first one in the vocabulary is reused rather than adding another.
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
META_FILE = "meta.json"
FORMAT = "bardlm-token-shards"
PIECE_CHARS = 1 << 16  # pieces this long keep every core busy on a few long books
BATCH_CHARS = 1 << 22  # characters per encode batch: enough pieces for all cores, little memory
BLOCK_BYTES = 1 << 20  # read size of text files
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
DEFAULT_SAMPLE_MB = 64  # text that bpe:VOCAB and word:N are trained on, at most

# A cut after "x\n" and before an ASCII letter or digit (x visible ASCII) changes no token of the
# char, word (`split_words`: a word boundary is there anyway) or byte-level BPE tokenizers (GPT-2
# and tiktoken patterns: a newline run ends there and the next word starts there).
_CUT = re.compile(r"(?<=[!-~]\n)(?=[A-Za-z0-9])")


# Sources and documents ------------------------------------------------------------------------
def find_sources(paths: Iterable[str | Path]) -> list[Path]:
    """The source files of --data: files as given, folders searched recursively (sorted, so the
    document order, and with it the split, does not depend on the file system)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # A broken symbolic link is a source too: reading it fails, so it is reported (or,
            # with --skip-bad, counted as unreadable) rather than silently left out.
            inside = sorted(f for f in p.rglob("*") if (f.is_file() or (f.is_symlink() and not f.exists()))
                            and f.name.endswith(SUFFIXES))
            if not inside:
                raise BardlmError(f"folder {p} holds no {', '.join(SUFFIXES)} files")
            found.extend(inside)
        elif p.is_file() or p.is_symlink():
            if not p.name.endswith(SUFFIXES):
                raise BardlmError(f"{p}: unknown kind of source; use {', '.join(SUFFIXES)} files or a folder")
            found.append(p)
        else:
            raise BardlmError(f"data source {p} does not exist; check the --data path")
    return found


@dataclass
class Problems:
    """Bad input: a one-line error, or with `skip` a count per kind (reported in meta.json)."""

    skip: bool = False
    counts: Counter[str] = field(default_factory=Counter)

    def __call__(self, kind: str, message: str) -> None:
        if not self.skip:
            raise BardlmError(f"{message}; fix or remove it, or pass --skip-bad to skip such input")
        self.counts[kind] += 1


# A source is read as a stream of events: ("text", piece) pieces of the current document,
# ("end", None) after its last piece, ("abort", None) when it turned out bad (skipped) midway.
Event = tuple[str, Any]


def cut_points(text: str, cuttable: bool, final: bool) -> tuple[list[str], str]:
    """Pieces of about PIECE_CHARS that can be encoded separately, and the rest to carry over.

    Not `cuttable` (a tokenizer whose normalizer or pre-tokenizer we cannot reason about): the
    document stays whole. `final`: no more text follows, so the rest is a piece too.
    """
    pieces, start = [], 0
    if cuttable:
        while len(text) - start > 2 * PIECE_CHARS:
            m = _CUT.search(text, start + PIECE_CHARS)
            if m is None:
                break
            pieces.append(text[start : m.start()])
            start = m.start()
    rest = text[start:]
    if final:
        return ([*pieces, rest] if rest else pieces), ""
    return pieces, rest


def _open(path: Path):  # noqa: ANN202
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_error(path: Path, e: BaseException) -> str:
    if isinstance(e, gzip.BadGzipFile | EOFError | zlib.error):
        return f"{path}: not valid gzip ({e or 'truncated'})"
    return f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})"


def read_text_file(path: Path, problems: Problems, cuttable: bool) -> Iterator[Event]:
    """One document: the whole (maybe gzipped) file, decoded as UTF-8 block by block."""
    carry_bytes, rest, offset = b"", "", 0  # offset: of carry_bytes in the file
    seen = emitted = False  # seen text that is not whitespace; yielded a piece
    try:
        with _open(path) as f:
            while True:
                block = f.read(BLOCK_BYTES)
                data = carry_bytes + block
                try:
                    text = data.decode("utf-8")
                    carry_bytes = b""
                except UnicodeDecodeError as e:
                    # A character cut by the block end is completed by the next block.
                    if block and e.reason == "unexpected end of data" and e.end == len(data):
                        text, carry_bytes = data[: e.start].decode("utf-8"), data[e.start :]
                    else:
                        if emitted:
                            yield "abort", None
                        problems("bad_utf8", f"{path}: not UTF-8 (bad byte at offset {offset + e.start})")
                        return
                if offset == 0 and text.startswith("\ufeff"):
                    text = text[1:]  # a byte-order mark is not text
                offset += len(data) - len(carry_bytes)
                seen = seen or not text.isspace() and bool(text)
                pieces, rest = cut_points(rest + text, cuttable, final=not block)
                for piece in pieces:
                    emitted = True
                    yield "text", piece
                if not block:
                    break
    except _READ_ERRORS as e:
        if emitted:
            yield "abort", None
        problems("unreadable", _read_error(path, e))
        return
    if not seen:
        if emitted:  # whitespace only: take back what went out
            yield "abort", None
        problems("empty", f"{path}: empty (no text)")
        return
    yield "end", None


def _document(text: str, cuttable: bool) -> Iterator[Event]:
    for piece in cut_points(text, cuttable, final=True)[0]:
        yield "text", piece
    yield "end", None


def read_jsonl(path: Path, field_name: str, problems: Problems, cuttable: bool) -> Iterator[Event]:
    """One document per line: the string field `field_name` of each JSON object."""
    n_docs, offset, lineno = 0, 0, 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):  # noqa: B007 (lineno is read after the loop)
                where = f"{path}:{lineno}"
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems("bad_utf8", f"{where}: not UTF-8 (bad byte at offset {start + e.start})")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problems("bad_json", f"{where}: not JSON ({e.msg} at column {e.colno})")
                    continue
                text = obj.get(field_name) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    problems("missing_field", f"{where}: no string field {field_name!r} "
                                              f"(choose the field with --text-field)")
                    continue
                if text:
                    n_docs += 1
                    yield from _document(text, cuttable)
    except _READ_ERRORS as e:
        problems("unreadable", _read_error(path, e) + (f" near line {lineno + 1}" if lineno else ""))
        return
    if n_docs == 0:
        problems("empty", f"{path}: empty (no documents with text in field {field_name!r})")


def read_parquet(path: Path, field_name: str, problems: Problems, cuttable: bool) -> Iterator[Event]:
    """One document per row: the string column `field_name`, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BardlmError("parquet sources need pyarrow; pip install 'bardlm[prepare]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        problems("unreadable", f"{path}: not a readable parquet file ({str(e).splitlines()[0]})")
        return
    if field_name not in pf.schema_arrow.names:
        problems("missing_field", f"{path}: no column {field_name!r} (columns: "
                                  f"{', '.join(pf.schema_arrow.names)}; choose one with --text-field)")
        return
    n_docs, row = 0, 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field_name]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                problems("missing_field", f"{path}: row {row} has no string {field_name!r}")
            elif text:
                n_docs += 1
                yield from _document(text, cuttable)
    if n_docs == 0:
        problems("empty", f"{path}: empty (no rows with text in column {field_name!r})")


def read_source(path: Path, field_name: str, problems: Problems, cuttable: bool) -> Iterator[Event]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path, field_name, problems, cuttable)
    if path.name.endswith(".parquet"):
        return read_parquet(path, field_name, problems, cuttable)
    return read_text_file(path, problems, cuttable)


def read_sources(paths: list[Path], field_name: str, problems: Problems, cuttable: bool) -> Iterator[Event]:
    for path in paths:
        yield from read_source(path, field_name, problems, cuttable)


def batched(events: Iterator[Event], chars: int | None = None) -> Iterator[list[Event]]:
    """Events grouped into batches of about `chars` (default BATCH_CHARS) characters of text."""
    chars = chars or BATCH_CHARS
    batch: list[Event] = []
    n = 0
    for ev in events:
        batch.append(ev)
        if ev[0] == "text":
            n += len(ev[1])
            if n >= chars:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, produced by a thread `depth` ahead: reading and decoding (Python) overlap the
    encoding (Rust threads that release the GIL). Errors are re-raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():  # the consumer may have gone (an error, an interrupt)
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put((None, e))
            return
        put((done, None))

    threading.Thread(target=run, daemon=True).start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()  # lets the reader thread end (and close its file) instead of waiting forever


# Tokenizers -----------------------------------------------------------------------------------
def is_cuttable(tok: Tokenizer) -> bool:
    """Whether pieces cut at `_CUT` encode to the ids of the whole text (see `_CUT`)."""
    if tok.kind in ("char", "word", "bpe_scratch", "tiktoken"):
        return True
    return bool(getattr(tok, "_chunked", False))  # HF: plain byte-level BPE only


def eos_id(tok: Tokenizer) -> int | None:
    """The tokenizer's own end-of-document id, if it has one."""
    if tok.kind == "char":
        return tok.chars.index(EOS_TOKEN) if EOS_TOKEN in tok.chars else None
    if tok.kind == "word":
        return tok.stoi.get(EOS_TOKEN)
    if tok.kind == "tiktoken":
        return int(tok.encoding.eot_token)
    if hasattr(tok, "hf"):
        return next((i for t in KNOWN_EOS if (i := tok.token_id(t)) is not None), None)
    return None


def with_eos(tok: Tokenizer) -> tuple[Tokenizer, int]:
    """The tokenizer with an end-of-document token (its own, else EOS_TOKEN added last)."""
    found = eos_id(tok)
    if found is not None:
        return tok, found
    if tok.kind == "char":
        tok = CharTokenizer([*tok.chars, EOS_TOKEN])
    elif tok.kind == "word":
        tok = WordTokenizer([*tok.words, EOS_TOKEN])
    elif hasattr(tok, "hf"):
        tok.hf.add_special_tokens([EOS_TOKEN])
        tok = type(tok)(tok.hf)  # re-reads the added token (HFTokenizer._chunked)
    else:
        raise BardlmError(f"a {tok.kind} tokenizer has no end-of-document token and none can be "
                          "added; use char, word, bpe or a tokenizer.json")
    return tok, tok.vocab_size - 1


def make_tokenizer(spec: str, paths: list[Path], field_name: str, skip_bad: bool,
                   sample_mb: float, seed: int, log: Callable[[str], None]) -> Tokenizer:
    """The tokenizer SPEC names: loaded from a file, or trained on the sources.

    char needs every character, so it reads all the text (a set per piece: memory is the
    alphabet). word:N and bpe:VOCAB are trained on a random sample of pieces, about `sample_mb`
    MB in all, drawn across the whole corpus: a few MB of text fix a vocabulary about as well as
    gigabytes, and training time and memory stay bounded.
    """
    name, _, arg = spec.partition(":")
    if name not in ("char", "word", "bpe"):
        return build(spec, "")  # a tokenizer.json (or a one-line error for an unknown spec)
    if arg and not arg.isdigit():
        build(spec, "x")  # the one-line error for a bad number
    total = sum(_size_estimate(p) for p in paths)
    fraction = 1.0 if name == "char" else min(1.0, sample_mb * 1e6 / max(total, 1))
    rng = random.Random(seed)
    problems = Problems(skip=skip_bad)  # counted again, once, by the encoding pass

    def sample() -> Iterator[str]:
        for kind, piece in read_sources(paths, field_name, problems, cuttable=True):
            if kind == "text" and rng.random() < fraction:
                yield piece

    t0 = time.time()
    if name == "char":
        chars: set[str] = set()
        for piece in sample():
            chars.update(piece)
        if not chars:
            raise BardlmError("the sources hold no text to build a character vocabulary from")
        tok: Tokenizer = CharTokenizer(sorted(chars))
    elif name == "word":
        counts: Counter[str] = Counter()
        for piece in sample():
            counts.update(split_words(piece))
        tok = WordTokenizer.from_counts(counts, min_count=int(arg) if arg else 1)
    else:
        tok = train_bpe_iter(sample(), vocab_size=int(arg) if arg else 4096)
    log(f"tokenizer {spec}: {tok.vocab_size:,} tokens, trained on "
        f"{'all' if fraction >= 1 else f'a {fraction:.1%} sample'} of the text in {time.time() - t0:.1f} s")
    return tok


def _size_estimate(path: Path) -> int:
    """Bytes of text in a source, roughly: compressed files hold about 3x their size."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0  # unreadable: reported, with its name, when it is read
    return size * 3 if path.name.endswith((".gz", ".parquet")) else size


class Encoder:
    """Encodes a batch of pieces into id arrays on every core.

    Hugging Face tokenizers (bpe, any tokenizer.json): `encode_batch_fast`, Rust threads.
    tiktoken: `encode_ordinary_batch`, threads. The Python tokenizers (char, word, bpe_scratch):
    a process pool, each worker holding its own copy of the tokenizer.
    """

    def __init__(self, tok: Tokenizer, workers: int) -> None:
        self.tok, self.workers, self.pool = tok, workers, None
        if not hasattr(tok, "hf") and tok.kind != "tiktoken" and workers > 1:
            import multiprocessing as mp

            # fork: workers start at once and share the parent's pages; the tokenizer is rebuilt
            # from its JSON so that nothing unpicklable crosses.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_dict(),))

    def __call__(self, pieces: list[str]) -> list[np.ndarray]:
        if not pieces:
            return []
        if hasattr(self.tok, "hf"):
            encs = self.tok.hf.encode_batch_fast(pieces, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encs]
        if self.tok.kind == "tiktoken":
            out = self.tok.encoding.encode_ordinary_batch(pieces, num_threads=self.workers)
            return [np.asarray(ids, dtype=np.int64) for ids in out]
        if self.pool is None:
            return [np.asarray(self.tok.encode(p), dtype=np.int64) for p in pieces]
        return self.pool.map(_encode_piece, pieces, chunksize=max(1, len(pieces) // (4 * self.workers)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


_WORKER_TOK: Tokenizer | None = None


def _init_worker(data: dict[str, Any]) -> None:
    global _WORKER_TOK
    from ..tokenizers import from_dict

    _WORKER_TOK = from_dict(data)


def _encode_piece(piece: str) -> np.ndarray:
    assert _WORKER_TOK is not None
    return np.asarray(_WORKER_TOK.encode(piece), dtype=np.int64)


# Shards ---------------------------------------------------------------------------------------
class ShardWriter:
    """Appends ids of one split to shard files {split}_00000.bin, ... of `shard_tokens` each.

    `rollback(mark)` truncates back to an earlier total (a document that turned out bad midway,
    or the tail that becomes the validation split), deleting shards past it.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.counts: list[int] = []  # tokens per shard; every shard but the last is full
        self.f = None

    @property
    def total(self) -> int:
        return sum(self.counts)

    def name(self, k: int) -> str:
        return f"{self.split}_{k:05d}.bin"

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(ids):
            if self.f is None or self.counts[-1] == self.shard_tokens:
                if self.f is not None:
                    self.f.close()
                self.counts.append(0)
                self.f = open(self.folder / self.name(len(self.counts) - 1), "wb")
            n = min(len(ids), self.shard_tokens - self.counts[-1])
            self.f.write(ids[:n].tobytes())
            self.counts[-1] += n
            ids = ids[n:]

    def rollback(self, mark: int) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        k = min(mark // self.shard_tokens, len(self.counts))
        keep = mark - k * self.shard_tokens
        for j in range(k + (keep > 0), len(self.counts)):
            (self.folder / self.name(j)).unlink()
        if keep:
            os.truncate(self.folder / self.name(k), keep * self.dtype.itemsize)
        self.counts = [*self.counts[:k], *([keep] if keep else [])]
        if self.counts and self.counts[-1] < self.shard_tokens:
            self.f = open(self.folder / self.name(len(self.counts) - 1), "ab")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Ids [start, stop) written so far (from the files: the writer keeps none in memory)."""
        if self.f is not None:
            self.f.flush()
        out = []
        for k, n in enumerate(self.counts):
            lo, hi = k * self.shard_tokens, k * self.shard_tokens + n
            if hi > start and lo < stop:
                m = np.memmap(self.folder / self.name(k), dtype=self.dtype, mode="r", shape=(n,))
                out.append(np.array(m[max(start, lo) - lo : min(stop, hi) - lo]))
        return np.concatenate(out) if out else np.zeros(0, self.dtype)

    def close(self) -> list[dict[str, Any]]:
        if self.f is not None:
            self.f.close()
            self.f = None
        return [{"file": self.name(k), "split": self.split, "tokens": n}
                for k, n in enumerate(self.counts)]


@dataclass
class SplitStats:
    documents: int = 0
    characters: int = 0
    bytes: int = 0


def prepare(
    sources: list[str | Path],
    tokenizer: str,
    out: str | Path,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    skip_bad: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    sample_mb: float = DEFAULT_SAMPLE_MB,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Prepare `sources` into the folder `out` (see the module docstring); returns meta.json.
    progress: a bar of text bytes encoded, against the sources' estimated size (a terminal only)."""
    from ..io.checkpoint import check_writable, save_tokenizer

    out = Path(out)
    if not 0 <= val_fraction < 1:
        raise BardlmError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise BardlmError(f"--shard-tokens {shard_tokens} must be at least 1")
    if not (math.isfinite(sample_mb) and sample_mb > 0):
        raise BardlmError(f"--sample-mb {sample_mb} must be a positive number of megabytes "
                          f"(default {DEFAULT_SAMPLE_MB:g}): word and bpe tokenizers learn from that sample")
    if out.exists() and not overwrite:
        raise BardlmError(f"{out} already exists; pass --overwrite to replace it")
    check_writable(out.parent if out.is_dir() else out)  # a folder replaced whole: its parent is written
    paths = find_sources(sources)
    workers = workers or os.cpu_count() or 1
    tok = make_tokenizer(tokenizer, paths, text_field, skip_bad, sample_mb, seed, log)
    tok, eos = with_eos(tok)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder = Encoder(tok, workers)
    problems = Problems(skip=skip_bad)
    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    stats = {s: SplitStats() for s in writers}
    rng = random.Random(seed)
    t0 = time.time()
    bar = progress_bar(progress, sum(_size_estimate(p) for p in paths), "prepare", unit="B")
    if bar is not None:
        bar.unit_scale = True  # kB, MB, ...
    try:
        cur: str | None = None  # split of the document being written, None between documents
        mark, doc_chars, doc_bytes = 0, 0, 0
        last_train_doc = (0, 0, 0)  # (start token, characters, bytes) of the last train document
        events = read_sources(paths, text_field, problems, is_cuttable(tok))
        for batch in prefetch(batched(events)):
            ids = iter(encoder([p for kind, p in batch if kind == "text"]))
            for kind, piece in batch:
                if cur is None and kind == "text":
                    cur = "val" if rng.random() < val_fraction else "train"
                    mark, doc_chars, doc_bytes = writers[cur].total, 0, 0
                if kind == "text":
                    writers[cur].write(next(ids))
                    doc_chars += len(piece)
                    n_bytes = len(piece.encode("utf-8", "surrogatepass"))
                    doc_bytes += n_bytes
                    if bar is not None:
                        bar.update(n_bytes)
                elif kind == "end" and cur is not None:
                    writers[cur].write(np.array([eos]))
                    st = stats[cur]
                    st.documents, st.characters, st.bytes = st.documents + 1, st.characters + doc_chars, st.bytes + doc_bytes
                    if cur == "train":
                        last_train_doc = (mark, doc_chars, doc_bytes)
                    cur = None
                elif kind == "abort" and cur is not None:
                    writers[cur].rollback(mark)
                    cur = None
        n_docs = stats["train"].documents + stats["val"].documents
        if n_docs == 0:
            raise BardlmError("the sources hold no documents with text")
        if stats["val"].documents == 0 and val_fraction > 0:
            _carve_val(writers, stats, last_train_doc, val_fraction)
        shards = writers["train"].close() + writers["val"].close()
        save_tokenizer(tok, tmp / "tokenizer.json")
        meta = {
            "format": FORMAT,
            "documents": n_docs,
            "tokens": writers["train"].total + writers["val"].total,
            "train_tokens": writers["train"].total,
            "val_tokens": writers["val"].total,
            "train_documents": stats["train"].documents,
            "val_documents": stats["val"].documents,
            "train_characters": stats["train"].characters,
            "val_characters": stats["val"].characters,
            "train_bytes": stats["train"].bytes,
            "val_bytes": stats["val"].bytes,
            "dtype": dtype.name,
            "tokenizer": "tokenizer.json",
            "tokenizer_spec": tokenizer,
            "tokenizer_kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": eos,
            "val_fraction": val_fraction,
            "seed": seed,
            "text_field": text_field,
            "sources": [str(p) for p in paths],
            "skipped": dict(problems.counts),
            "shards": shards,
            "elapsed_s": round(time.time() - t0, 3),
        }
        # meta.json last, then one rename: a reader sees a whole folder or none.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        encoder.close()
        for w in writers.values():
            w.close()
    log(f"prepared {out}: {meta['documents']:,} documents, {meta['tokens']:,} tokens "
        f"({meta['train_tokens']:,} train, {meta['val_tokens']:,} validation) in {meta['elapsed_s']:.1f} s")
    return meta


def _carve_val(writers: dict[str, ShardWriter], stats: dict[str, SplitStats],
               last_doc: tuple[int, int, int], val_fraction: float) -> None:
    """No document was drawn for validation: the last document validates, or, in a corpus of
    one document, its last `val_fraction` of tokens (the split by position of a text file)."""
    train, tr = writers["train"], stats["train"]
    total = train.total
    if tr.documents >= 2:
        start, n_chars, n_bytes = last_doc
        docs = 1
    else:
        start = total - int(total * val_fraction)
        frac = (total - start) / max(total, 1)
        n_chars, n_bytes, docs = round(tr.characters * frac), round(tr.bytes * frac), 0
    for lo in range(start, total, 1 << 24):  # bounded memory, whatever the size of the tail
        writers["val"].write(train.read(lo, min(lo + (1 << 24), total)))
    train.rollback(start)
    va = stats["val"]
    va.documents, va.characters, va.bytes = docs, n_chars, n_bytes
    tr.documents, tr.characters, tr.bytes = tr.documents - docs, tr.characters - n_chars, tr.bytes - n_bytes
