"""What the HTTP server costs: tokens/s through `bardlm serve` vs `generate_text` called directly.

Everything runs in one process, on one model, with greedy decoding, so the ratios compare like
with like:
  direct       generate_text(model, tok, prompt, N) in a loop
  http         POST /v1/completions (whole answer) one request at a time
  http-stream  the same with stream=true (one SSE event per piece of text)
  http-8       8 clients at once (the server queues them; total tokens/s)

    PYTHONPATH=src python bench/serve_overhead.py [--preset char-tiny] [--block-size 256]
"""

from __future__ import annotations

import argparse
import asyncio
import string
import threading
import time

import httpx
import torch
import uvicorn

from bardlm import GPT, preset
from bardlm.infer.generate import generate_text
from bardlm.serve import bind, build_app
from bardlm.tokenizers import CharTokenizer


def start_server(app) -> tuple[uvicorn.Server, str]:  # noqa: ANN001
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Best wall time of `repeats` calls (the least disturbed by other load on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="char-tiny")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=200, help="tokens per request")
    ap.add_argument("--requests", type=int, default=5, help="requests per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tok = CharTokenizer(sorted(set(string.printable)))
    torch.manual_seed(0)
    model = GPT(preset(args.preset, vocab_size=tok.vocab_size, block_size=args.block_size)).eval()
    prompt, n, k = "ROMEO:", args.tokens, args.requests
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    server, base = start_server(build_app(model, tok, max_queue=16))
    client = httpx.Client(base_url=base, timeout=600)

    def direct() -> None:
        for _ in range(k):
            generate_text(model, tok, prompt, n, temperature=0)

    def http() -> None:
        for _ in range(k):
            assert client.post("/v1/completions", json=body).status_code == 200

    def http_stream() -> None:
        for _ in range(k):
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                for _ in r.iter_lines():
                    pass

    def http_concurrent() -> None:
        async def go() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=600) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/completions", json=body) for _ in range(8)))
                assert all(r.status_code == 200 for r in rs)
        asyncio.run(go())

    http()  # warm-up
    base_s = timed(direct, args.repeats)
    rows = [("direct generate_text", base_s, k * n)]
    rows.append(("http, whole answer", timed(http, args.repeats), k * n))
    rows.append(("http, streamed (SSE)", timed(http_stream, args.repeats), k * n))
    rows.append(("http, 8 clients at once", timed(http_concurrent, args.repeats), 8 * n))
    print(f"{args.preset} (block {args.block_size}), {n} tokens per request, "
          f"torch threads {torch.get_num_threads()}")
    base_tps = k * n / base_s
    for name, secs, tokens in rows:
        tps = tokens / secs
        print(f"{name:<26} {tps:8.0f} tokens/s   {tps / base_tps:5.2f}x direct")
    server.should_exit = True


if __name__ == "__main__":
    main()
