"""The serving engine without HTTP: what one batched decode step costs at 1 and 16 active slots,
and the engine's aggregate tokens/s for 16 concurrent requests against 1.

    PYTHONPATH=src python bench/serve_engine.py                 # GPT-2 124M shape (random weights)
    PYTHONPATH=src python bench/serve_engine.py --preset char-tiny --rounds 1 --tokens 8   # smoke

The same model and tokenizer `bench/serve.py` serves (its character vocabulary), in one
`Engine` (max batch 32, as `bench/serve.py`), in this process. Each level runs --clients
concurrent "clients", each submitting --requests greedy requests one after another (a
--prompt-token prompt, --tokens new tokens), the next as soon as the previous one is done.
The levels alternate round by round (1, 16, 1, 16, ...), so a change in the machine's load hits
both alike. Reported per level: aggregate tokens/s (medians over rounds), and the milliseconds
of a decode step with every client's request generating: the whole step (forward pass, sampling,
text) and the forward pass alone. The first figures are what `bench/serve.py` measures less
HTTP and the clients; the step times say what a batched step costs against one row. Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from serve import make_model_dir

import bardlm
from bardlm.serve import Engine, Job


def run_level(engine: Engine, prompts: list[str], clients: int, requests: int,
              tokens: int) -> dict[str, float]:
    """`clients` clients of `requests` requests each; tokens/s and per-step milliseconds."""
    steps: list[tuple[int, float, float]] = []  # (rows, whole step s, forward s)
    forward = engine._step
    decode = engine._decode
    last = [0.0]

    def timed_forward(*args):  # noqa: ANN002, ANN202
        t = time.perf_counter()
        out = forward(*args)
        last[0] = time.perf_counter() - t
        return out

    def timed_decode(rows) -> None:  # noqa: ANN001
        t = time.perf_counter()
        decode(rows)
        steps.append((len(rows), time.perf_counter() - t, last[0]))

    engine._step, engine._decode = timed_forward, timed_decode
    done = threading.Semaphore(0)

    def client(i: int, left: int) -> None:
        if left == 0:
            done.release()
            return
        job = Job(prompts[(7 * i + left) % len(prompts)], tokens, sampling={"temperature": 0.0})
        future = engine.try_submit(job)
        future.add_done_callback(lambda _f: client(i, left - 1))

    t = time.perf_counter()
    with engine._lock:  # the first requests arrive together: the worker admits them in one turn
        for i in range(clients):
            client(i, requests)
    for _ in range(clients):
        done.acquire()
    wall = time.perf_counter() - t
    engine._step, engine._decode = forward, decode
    full = [(s, f) for n, s, f in steps if n == clients]
    return {"tokens_per_sec": clients * requests * tokens / wall,
            "step_ms": 1000 * statistics.median(s for s, _ in full),
            "forward_ms": 1000 * statistics.median(f for _, f in full)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all levels, interleaved")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        chars = make_model_dir(Path(tmp) / "model", args.preset)
        model, tok = bardlm.load(Path(tmp) / "model", dtype="fp32")  # as `bardlm serve`
    rng = random.Random(0)
    prompts = ["".join(rng.choice(chars[:5000]) for _ in range(args.prompt)) for _ in range(64)]
    engine = Engine(model, tok, max_batch=args.max_batch, max_queue=64)
    uptime_before = os.getloadavg()[0]
    try:
        run_level(engine, prompts, 1, 1, 4)  # warm-up
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.clients}
        for _ in range(args.rounds):
            for n in args.clients:
                runs[n].append(run_level(engine, prompts, n, args.requests, args.tokens))
    finally:
        engine.shutdown()
    one = args.clients[0]
    rows = {}
    print(f"{args.preset}, torch threads {torch.get_num_threads()}, prompt {args.prompt}, "
          f"{args.tokens} new tokens, {args.requests} requests per client, {args.rounds} rounds; "
          f"load {uptime_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    for n, rs in runs.items():
        row = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
        rows[n] = row
        print(f"  {n:>3} clients: {row['tokens_per_sec']:8.1f} tok/s "
              f"(x{row['tokens_per_sec'] / rows[one]['tokens_per_sec']:.2f})  step "
              f"{row['step_ms']:7.1f} ms (x{row['step_ms'] / rows[one]['step_ms']:.2f}), "
              f"forward {row['forward_ms']:7.1f} ms", flush=True)
    print(json.dumps({"preset": args.preset, "threads": torch.get_num_threads(),
                      "prompt_tokens": args.prompt, "new_tokens": args.tokens,
                      "requests_per_client": args.requests, "rounds": args.rounds,
                      "levels": rows, "load_avg_1m": [round(uptime_before, 2),
                                                      round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
