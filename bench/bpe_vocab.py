"""Byte-level BPE on the complete works: training time and characters per token by vocab size.

    python bench/bpe_vocab.py --data ../shared/data/shakespeare_complete.txt

Trains `bardlm.bpe.train_bpe` (Hugging Face `tokenizers`) for each vocab size on the whole
corpus, encodes the corpus with it, checks that decoding gives the text back, and prints a
markdown table followed by one JSON line with the same figures. `--scratch` also times the
pure-Python `train_bpe_scratch` on the smallest vocab size (and checks it learns the same merges).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named tokenizers.py: run as a script, its folder comes first on sys.path and would
# shadow the Hugging Face `tokenizers` package. Take the folder off the path before any import.
HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

REPO = HERE.parent
try:
    from bardlm.tokenizers import bpe
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(REPO / "src"))
    from bardlm.tokenizers import bpe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/shakespeare_complete.txt")
    parser.add_argument("--vocab-sizes", default="1024,4096,16384")
    parser.add_argument("--scratch", action="store_true", help="also time train_bpe_scratch")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]

    path = Path(args.data)
    if not path.is_file():
        sys.exit(f"corpus {path} not found; pass --data PATH/TO/shakespeare_complete.txt")
    text = path.read_text(encoding="utf-8")
    sizes = [int(v) for v in args.vocab_sizes.split(",")]
    print(f"corpus {path.name}: {len(text):,} characters, {len(text.encode()):,} bytes", flush=True)

    rows = []
    for vocab_size in sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        tok = bpe.train_bpe(text, vocab_size=vocab_size)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        ids = tok.encode(text)
        encode_s, encode_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        round_trip = tok.decode(ids) == text
        row = {
            "tokenizer": "bpe (HF tokenizers)",
            "vocab_size": tok.vocab_size,
            "train_s": round(train_s, 2),
            "train_cpu_s": round(train_cpu_s, 2),
            "tokens": len(ids),
            "chars_per_token": round(len(text) / len(ids), 3),
            "encode_s": round(encode_s, 2),
            "encode_cpu_s": round(encode_cpu_s, 2),
            "round_trip": round_trip,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.scratch:
        vocab_size = min(sizes)
        t0, c0 = time.perf_counter(), time.process_time()
        merges = bpe.train_bpe_scratch(text, vocab_size=vocab_size)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        scratch = bpe.ScratchBPETokenizer(merges)
        same = merges == bpe.train_bpe(text, vocab_size=vocab_size).merges()
        t0, c0 = time.perf_counter(), time.process_time()
        ids = scratch.encode(text)
        encode_s, encode_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        row = {
            "tokenizer": "bpe_scratch (pure Python)",
            "vocab_size": scratch.vocab_size,
            "train_s": round(train_s, 2),
            "train_cpu_s": round(train_cpu_s, 2),
            "tokens": len(ids),
            "chars_per_token": round(len(text) / len(ids), 3),
            "encode_s": round(encode_s, 2),
            "encode_cpu_s": round(encode_cpu_s, 2),
            "round_trip": scratch.decode(ids) == text,
            "same_merges_as_hf": same,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print(
        "| tokenizer | vocab | train wall (s) | train CPU (s) | tokens | chars/token "
        "| encode wall (s) | encode CPU (s) | round trip |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['train_s']:.2f} "
            f"| {r['train_cpu_s']:.2f} | {r['tokens']:,} | {r['chars_per_token']:.2f} "
            f"| {r['encode_s']:.2f} | {r['encode_cpu_s']:.2f} "
            f"| {'exact' if r['round_trip'] else 'FAIL'} |"
        )
    print(
        f"| char (one id per character) | {len(set(text))} | - | - | {len(text):,} | 1.00 "
        "| - | - | exact |"
    )
    print()
    summary = {
        "bench": "tokenizers",
        "data": path.name,
        "chars": len(text),
        "rows": rows,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1min_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
