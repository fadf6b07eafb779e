"""Serving load: `bardlm serve` under 1, 4, 16 and 32 concurrent streaming clients.

    PYTHONPATH=src python bench/serve.py                      # GPT-2 124M shape (random weights)
    PYTHONPATH=src python bench/serve.py --preset qwen3-tiny --clients 2 --requests 1 --tokens 8
                                                              # smoke test

The model has random weights and a character vocabulary as large as the preset's (one token,
one character: each streamed chunk is one token), saved as a Hugging Face directory, so the
anchor, `transformers serve --continuous-batching`, can load the very same files (it is tried
unless --no-anchor; where it cannot run here the output says why). Each client sends
--requests streaming requests one after another: a --prompt-token prompt, --tokens greedy new
tokens. Reported per concurrency level: aggregate tokens/s (all tokens / wall time), time to
first token and per-token latency (gaps between chunks), p50 and p99. The clients run in this
process and share the CPU with the server: on a 2-core machine they cost the server some speed.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from bardlm import GPT, preset


def char_vocab(n: int) -> list[str]:
    """n distinct printable characters (CJK and beyond; no surrogates, no U+FFFD)."""
    cps = (c for c in range(0x4E00, 0x40000) if not 0xD800 <= c <= 0xDFFF and c != 0xFFFD)
    return [chr(next(cps)) for _ in range(n)]


def make_model_dir(out: Path, preset_name: str, seed: int = 0) -> list[str]:
    """A Hugging Face directory (config, weights, a char-level tokenizer.json); its vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bardlm.io.hf import save_pretrained

    torch.manual_seed(seed)
    cfg = preset(preset_name)
    model = GPT(cfg).eval()
    if cfg.vocab_size < 100:  # tiny presets: too few tokens for a varied text
        cfg = preset(preset_name, vocab_size=256)
        model = GPT(cfg).eval()
    chars = char_vocab(cfg.vocab_size)
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")  # one character, one token
    tk.decoder = decoders.Fuse()  # ids back to text with nothing in between
    save_pretrained(model, out)
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(out)
    return chars


class Server:
    """A server command in its own process; its URL read from its output."""

    def __init__(self, cmd: list[str], url_pattern: str, port: int | None = None,
                 timeout: float = 300) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._wait(url_pattern, port, timeout)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def _wait(self, pattern: str, port: int | None, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("exited: " + "".join(self.log[-5:]).strip()[-400:])
            if port is not None:  # no URL printed: poll its health route
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    return f"http://127.0.0.1:{port}"
                except httpx.HTTPError:
                    time.sleep(0.5)
                    continue
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if m := re.search(pattern, line):
                return m.group(1)
        raise RuntimeError(f"did not start in {timeout:.0f} s: " + "".join(self.log[-5:])[-400:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def one_request(c: httpx.AsyncClient, body: dict) -> dict:
    """Stream one completion: start, first-token and per-chunk times."""
    t0 = time.perf_counter()
    stamps, text = [], []
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                msg = json.loads(line[6:])
                if msg.get("choices") and msg["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                    text.append(msg["choices"][0]["text"])
    return {"ttft": stamps[0] - t0 if stamps else None, "tokens": len(stamps),
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "text": "".join(text)}


async def drive(url: str, n_clients: int, n_requests: int, body_of) -> dict:  # noqa: ANN001
    """n_clients clients, each sending n_requests requests back to back."""
    async def client(i: int) -> list[dict]:
        return [await one_request(c, body_of(i, j)) for j in range(n_requests)]

    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t = time.perf_counter()
        runs = [r for rs in await asyncio.gather(*(client(i) for i in range(n_clients))) for r in rs]
        wall = time.perf_counter() - t
    ttft = [r["ttft"] for r in runs if r["ttft"] is not None]
    gaps = [g for r in runs for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in runs)
    return {"clients": n_clients, "requests": len(runs), "tokens": tokens, "text": runs[0]["text"],
            "tokens_per_sec": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
            "token_p50_ms": ms(pct(gaps, 50)), "token_p99_ms": ms(pct(gaps, 99))}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def run_levels(name: str, url: str, levels: list[int], args: argparse.Namespace, model: str,
               chars: list[str]) -> list[dict]:
    import random

    rng = random.Random(0)
    prompts = ["".join(rng.choice(chars[:5000]) for _ in range(args.prompt)) for _ in range(64)]

    def body(i: int, j: int) -> dict:
        return {"model": model, "prompt": prompts[(i * 7 + j) % len(prompts)],
                "max_tokens": args.tokens, "temperature": 0, "stream": True}

    warm = asyncio.run(drive(url, 1, 1, body))  # warm-up; its text compares the servers
    rows = [{"warmup_text": warm["text"]}]
    for n in levels:
        row = asyncio.run(drive(url, n, args.requests, body))
        del row["text"]
        rows.append(row)
        print(f"  {name:<13} {n:>3} clients: {row['tokens_per_sec']:>8.1f} tok/s  TTFT p50 "
              f"{row['ttft_p50_ms']} p99 {row['ttft_p99_ms']} ms  per token p50 "
              f"{row['token_p50_ms']} p99 {row['token_p99_ms']} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--no-anchor", action="store_true", help="skip transformers serve")
    ap.add_argument("--anchor-timeout", type=float, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        chars = make_model_dir(model_dir, args.preset)
        levels = sorted(set(args.clients))
        print(f"{args.preset} (random weights, {len(chars)}-character vocabulary); prompt "
              f"{args.prompt}, {args.tokens} new tokens, {args.requests} requests per client; "
              f"max batch {args.max_batch}", flush=True)
        ours = Server([sys.executable, "-m", "bardlm", "serve", "--ckpt", str(model_dir),
                       "--port", "0", "--max-batch", str(args.max_batch), "--max-queue", "64",
                       "--log-level", "warning", "--model-name", "bench"],
                      r"at (http://[\d.]+:\d+)/v1")
        try:
            results = {"bardlm": run_levels("bardlm", ours.url, levels, args, "bench", chars)}
        finally:
            ours.stop()
        anchor_note = "not run (--no-anchor)"
        if not args.no_anchor:
            anchor_note, rows = try_anchor(model_dir, levels, args, chars)
            if rows:
                results["transformers_serve_cb"] = rows
        print(f"anchor (transformers serve --continuous-batching): {anchor_note}")
    texts = {k: rows.pop(0)["warmup_text"] for k, rows in results.items()}
    same = texts.get("bardlm") == texts.get("transformers_serve_cb") if len(texts) == 2 else None
    summary = {"preset": args.preset, "prompt_tokens": args.prompt, "new_tokens": args.tokens,
               "requests_per_client": args.requests, "max_batch": args.max_batch,
               "results": results, "anchor": anchor_note, "same_greedy_text_as_anchor": same,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(summary))


def try_anchor(model_dir: Path, levels: list[int], args: argparse.Namespace,
               chars: list[str]) -> tuple[str, list[dict] | None]:
    """`transformers serve --continuous-batching` on the same directory, on the CPU, offline."""
    import shutil
    import socket

    exe = shutil.which("transformers")
    if exe is None:
        return "not run: the `transformers` command is not installed", None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        srv = Server([exe, "serve", "--continuous-batching", "--device", "cpu", "--host",
                      "127.0.0.1", "--port", str(port), str(model_dir)], "", port=port,
                     timeout=args.anchor_timeout)
    except RuntimeError as e:
        return f"not run: transformers serve did not start ({e})", None
    try:
        return "ran", run_levels("transformers", srv.url, levels, args, str(model_dir), chars)
    except Exception as e:  # noqa: BLE001
        return f"not run: requests failed ({type(e).__name__}: {str(e)[:300]})", None
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
