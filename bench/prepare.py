"""`bardlm prepare` speed and memory against the raw encoder of the same tokenizer, one run.

Builds a corpus of --mb MB in a temporary folder (files of about 4 MB, paragraphs of the complete
works of Shakespeare shuffled from a seed), then for each tokenizer:

  prepare   `python -m bardlm prepare` in a child process under /usr/bin/time: MB/s and tokens/s
            over its reading+encoding+writing loop (meta.json elapsed_s), the whole command's
            wall time, and its peak RSS;
  raw       the tokenizer's own batch encoder on the same text in this process, no files:
            HF tokenizers `encode_batch_fast`, tiktoken `encode_ordinary_batch` (gpt2, only when
            its files are already in tiktoken's cache; the JSON says so when they are not).

ratio = prepare MB/s / raw MB/s (goal >= 0.8 with both cores busy); peak RSS should not grow with
--mb. Ends with one JSON line. Example:

    python bench/prepare.py --mb 20
    python bench/prepare.py --mb 500 --skip-raw     # memory at scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bardlm.errors import BardlmError  # noqa: E402
from bardlm.io.checkpoint import save_tokenizer  # noqa: E402
from bardlm.tokenizers import load as load_tokenizer  # noqa: E402
from bardlm.tokenizers import train_bpe  # noqa: E402
from bardlm.train import prepare as P  # noqa: E402
from bardlm.train.data import load_corpus  # noqa: E402


def make_corpus(folder: Path, mb: float, source: str, seed: int = 0) -> int:
    """Files of about 4 MB of shuffled paragraphs of `source` (a corpus name) until `mb` MB;
    returns bytes."""
    text, _ = load_corpus(source)
    paras = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, total, k = int(mb * 1e6), 0, 0
    while total < target:
        rng.shuffle(paras)
        buf, n = [], 0
        for p in paras:
            buf.append(p)
            n += len(p.encode())
            if n >= min(4_000_000, target - total):
                break
        data = "".join(buf).encode()
        (folder / f"book{k:05d}.txt").write_bytes(data)
        total, k = total + len(data), k + 1
    return total


def run_prepare(corpus: Path, tok_path: Path, out: Path, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "bardlm", "prepare", "--data", str(corpus), "--tokenizer",
           str(tok_path), "--out", str(out), "--overwrite"]
    if workers:
        cmd += ["--workers", str(workers)]
    stats = out.parent / f"{out.name}.time"
    timer = ["/usr/bin/time", "-o", str(stats), "-f", "%M %e"] if Path("/usr/bin/time").exists() else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([*timer, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    meta = json.loads((out / "meta.json").read_text())
    if timer:
        rss_kb = int(stats.read_text().split()[-2])
    else:  # max over children so far: good enough when prepare is the biggest child
        import resource

        rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    mb = (meta["train_bytes"] + meta["val_bytes"]) / 1e6
    return {"tokens": meta["tokens"], "documents": meta["documents"], "shards": len(meta["shards"]),
            "loop_s": meta["elapsed_s"], "wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1),
            "mb_s": round(mb / meta["elapsed_s"], 2), "tokens_s": round(meta["tokens"] / meta["elapsed_s"])}


def raw_speed(corpus: Path, tok, max_mb: float) -> dict:
    """The tokenizer's batch encoder alone on the same pieces (up to `max_mb` MB of them)."""
    pieces, n = [], 0
    for f in sorted(corpus.iterdir()):
        for kind, piece in P.read_source(f, "text", P.Problems(), P.is_cuttable(tok)):
            if kind == "text":
                pieces.append(piece)
                n += len(piece.encode())
        if n >= max_mb * 1e6:
            break
    batches, cur, chars = [], [], 0
    for p in pieces:  # the batches prepare makes
        cur.append(p)
        chars += len(p)
        if chars >= P.BATCH_CHARS:
            batches.append(cur)
            cur, chars = [], 0
    batches += [cur] if cur else []
    if hasattr(tok, "hf"):
        def encode(b):  # noqa: ANN001, ANN202
            return sum(len(e.ids) for e in tok.hf.encode_batch_fast(b, add_special_tokens=False))
    else:
        workers = os.cpu_count() or 1

        def encode(b):  # noqa: ANN001, ANN202
            return sum(len(ids) for ids in tok.encoding.encode_ordinary_batch(b, num_threads=workers))
    encode(batches[0][:4])  # warm up
    t0 = time.perf_counter()
    tokens = sum(encode(b) for b in batches)
    dt = time.perf_counter() - t0
    return {"mb": round(n / 1e6, 2), "mb_s": round(n / 1e6 / dt, 2), "tokens_s": round(tokens / dt)}


def tiktoken_gpt2() -> tuple[object | None, str]:
    from bardlm.tokenizers.tiktoken import TIKTOKEN_FILES, _cached_ok, tiktoken_cache_dir

    cache = tiktoken_cache_dir()
    if cache is None or not all(_cached_ok(cache, url, sha) for url, sha in TIKTOKEN_FILES["gpt2"]):
        return None, f"not measured: tiktoken's gpt2 files are not in its cache ({cache})"
    from bardlm.tokenizers import load_tiktoken

    return load_tiktoken("gpt2"), "gpt2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20, help="corpus size in MB")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary, trained on Shakespeare")
    ap.add_argument("--raw-mb", type=float, default=64, help="MB the raw encoder is timed on, at most")
    ap.add_argument("--skip-raw", action="store_true", help="prepare only (memory at scale)")
    ap.add_argument("--workers", type=int, help="prepare --workers (default: every core)")
    ap.add_argument("--corpus", default="shakespeare",
                    help="the text sampled and the BPE trained on: shakespeare (the complete works, "
                         "the default) or tiny-shakespeare (shipped with bardlm: offline smoke runs)")
    args = ap.parse_args()
    res: dict = {"mb": args.mb, "cores": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2)}
    work = Path(tempfile.mkdtemp(prefix="bardlm-bench-prepare-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        res["corpus_bytes"] = make_corpus(corpus, args.mb, args.corpus)
        text, _ = load_corpus(args.corpus)
        tokenizers = {"hf_bpe": train_bpe(text, args.vocab)}
        del text
        tt, note = tiktoken_gpt2()
        if tt is not None:
            tokenizers["tiktoken_gpt2"] = tt
        else:
            res["tiktoken_gpt2"] = note
        for name, tok in tokenizers.items():
            path = work / f"{name}.json"
            save_tokenizer(tok, path)
            row = {"prepare": run_prepare(corpus, path, work / name, args.workers)}
            shutil.rmtree(work / name)
            if not args.skip_raw:
                row["raw"] = raw_speed(corpus, load_tokenizer(path), args.raw_mb)
                row["ratio"] = round(row["prepare"]["mb_s"] / row["raw"]["mb_s"], 3)
            res[name] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    try:
        main()
    except BardlmError as e:  # e.g. offline without the complete works: one line, not a traceback
        sys.exit(f"bench/prepare.py: {e}")
