"""Faults under load: 64 clients at once, some hanging up mid-stream, some cancelled, some
sending bad requests. No slot leaks, no lost or crossed tokens, and the server keeps answering.
Loopback only, bounded in time."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import ThreadServer, make_checkpoint, wait_until  # noqa: E402

from bardlm.infer.generate import generate_text  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.serve import build_app  # noqa: E402

N_CLIENTS = 64
MAX_BATCH = 16
PROMPTS = [("ROMEO:", 30), ("To be, or not", 24), ("a", 12), ("Hello there, friend", 36),
           ("What light", 8), ("O", 40), ("Now is the winter", 20), ("1 2 3", 16)]
BAD = [
    (b"{not json", "application/json", 400),
    (b'{"prompt": "hi", "seed": 18446744073709551616}', "application/json", 400),
    (b'{"prompt": "hi", "max_tokens": 500}', "application/json", 400),
    (b'{"prompt": "hi", "repetition_penalty": 1e-38, "temperature": 1}', "application/json", 400),
    (b'{"prompt": "hi"}', "text/plain", 415),
    (b'{"prompt": "hi", "max_tokenz": 3}', "application/json", 400),
]


async def stream_text(c: httpx.AsyncClient, body: dict, hang_up_after: int | None = None) -> str | None:
    """The streamed completion; or None after hanging up once `hang_up_after` pieces came."""
    pieces = []
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code == 503:
            return "busy"
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                if hang_up_after is not None and len(pieces) >= hang_up_after:
                    return None  # leaving the block closes the connection mid-stream
    return "".join(pieces)


async def client(i: int, c: httpx.AsyncClient, rng: random.Random) -> tuple[str, object, object]:
    """(kind, what was asked, what came back) for client i."""
    await asyncio.sleep(rng.random() * 0.2)  # staggered arrivals: jobs join a running batch
    prompt, n = PROMPTS[i % len(PROMPTS)]
    greedy = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    kind = ["stream", "stream", "plain", "hang_up", "bad", "cancel", "seeded", "stream"][i % 8]
    if kind == "stream":
        return kind, (prompt, n, {}), await stream_text(c, greedy)
    if kind == "plain":
        r = await c.post("/v1/completions", json=greedy)
        return kind, (prompt, n, {}), r.json()["choices"][0]["text"] if r.status_code == 200 else "busy"
    if kind == "hang_up":
        return kind, None, await stream_text(c, greedy, hang_up_after=rng.randint(1, 4))
    if kind == "bad":
        body, ctype, status = BAD[i % len(BAD)]
        r = await c.post("/v1/completions", content=body, headers={"Content-Type": ctype})
        return kind, status, r.status_code
    if kind == "cancel":  # a client that gives up on a plain request after a moment
        try:
            await asyncio.wait_for(c.post("/v1/completions", json=greedy), rng.uniform(0.02, 0.2))
        except asyncio.TimeoutError:
            pass
        return kind, None, None
    seeded = {"temperature": 1.0, "top_k": 10, "seed": i}
    return kind, (prompt, n, seeded), await stream_text(c, {**greedy, **seeded})


def test_64_clients_with_faults(tmp_path) -> None:  # noqa: ANN001
    model, tok, _ = load_checkpoint(make_checkpoint(tmp_path / "tiny-faults"))
    model.register_forward_pre_hook(lambda _m, _a: time.sleep(0.001))  # so that requests overlap
    app = build_app(model, tok, model_name="tiny-faults", max_batch=MAX_BATCH, max_queue=64,
                    prefill_chunk=8)
    engine = app.state.engine
    rng = random.Random(0)

    async def crowd() -> list:
        limits = httpx.Limits(max_connections=N_CLIENTS * 2)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(client(i, c, rng) for i in range(N_CLIENTS)))

    with ThreadServer(app) as srv:
        base = srv.base_url
        results = asyncio.run(crowd())
        assert wait_until(lambda: engine.stats()["running"] + engine.stats()["queued"] == 0, 30)
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["running"] == 0 and health["queued"] == 0
        assert engine.accepted == 0 and sorted(engine._free) == list(range(MAX_BATCH))  # no leaks
        assert health["peak_running"] > 4  # the crowd really shared the batch
        assert health["failed"] == 0
        # Still answering, with the right tokens.
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 30,
                                                       "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == generate_text(model, tok, "ROMEO:", 30, temperature=0)
    checked = 0
    for kind, asked, got in results:
        if kind == "bad":
            assert got == asked
        elif kind in ("stream", "plain", "seeded") and got != "busy":
            prompt, n, kw = asked
            assert got == generate_text(model, tok, prompt, n, **{"temperature": 0, **kw}), (kind, asked)
            checked += 1
    assert checked >= 32
    print(f"{checked} completions checked; health at the end: {health}")
