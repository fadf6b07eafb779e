"""Continuous batching: requests that run together give the tokens they would give alone.

A tiny char model (serve_helpers) behind a server with 32 slots; references are `generate_text`
(the single-request library path, what `bardlm generate` runs) and the `bardlm generate`
command itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import ThreadServer, make_checkpoint, reference_greedy, wait_until  # noqa: E402

from bardlm.infer.generate import generate_text  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.serve import Engine, Job, build_app  # noqa: E402

NAME = "tiny-batch"
WORDS = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet"


def prompts(n: int) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs: prompt lengths 1..n+4, budgets 3..42 (all fit in 96)."""
    return [(WORDS[: 1 + (5 * i) % 45], 3 + (7 * i) % 40) for i in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("batch") / NAME)


@pytest.fixture(scope="module")
def loaded(ckpt: Path):  # noqa: ANN201
    model, tok, _ = load_checkpoint(ckpt)
    return model, tok


@pytest.fixture(scope="module")
def server(ckpt: Path):  # noqa: ANN201
    model, tok, _ = load_checkpoint(ckpt)
    # 2 ms per forward pass, so that 32 requests really overlap; prefill in chunks of 8 tokens.
    model.register_forward_pre_hook(lambda _m, _a: time.sleep(0.002))
    app = build_app(model, tok, model_name=NAME, max_batch=32, max_queue=8, prefill_chunk=8)
    with ThreadServer(app) as srv:
        yield srv


async def complete(client: httpx.AsyncClient, prompt: str, n: int, stream: bool, **kw) -> str:  # noqa: ANN003
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, **kw}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    import json

    text = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def run_concurrently(base_url: str, jobs: list[tuple[str, int, dict]]) -> list[str]:
    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            return await asyncio.gather(*(complete(client, p, n, i % 2 == 0, **kw)
                                          for i, (p, n, kw) in enumerate(jobs)))
    return asyncio.run(main())


def test_32_concurrent_greedy_requests_equal_single_requests(server, loaded, ckpt, capsys) -> None:  # noqa: ANN001
    model, tok = loaded
    pairs = prompts(32)
    together = run_concurrently(server.base_url, [(p, n, {}) for p, n in pairs])
    h = httpx.get(f"{server.base_url}/health").json()
    assert h["peak_running"] > 8, h  # they really ran as one batch, not one after another
    alone = [run_concurrently(server.base_url, [(p, n, {})])[0] for p, n in pairs[:8]]
    assert together[:8] == alone
    assert together == [generate_text(model, tok, p, n, temperature=0) for p, n in pairs]
    from bardlm.cli import main

    for p, n in pairs[5:8]:  # `bardlm generate` prints prompt + completion
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", p, "--temperature", "0",
                     "--max-new-tokens", str(n)]) == 0
        assert capsys.readouterr().out == p + together[pairs.index((p, n))] + "\n"
    assert wait_until(lambda: httpx.get(f"{server.base_url}/health").json()["running"] == 0)


def test_seeded_sampling_in_a_batch_equals_alone(server, loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    settings = [dict(temperature=1.0, seed=s, top_k=k, top_p=p, repetition_penalty=r)
                for s, k, p, r in [(1, None, 1.0, 1.0), (2, 20, 0.9, 1.0), (3, 5, 1.0, 1.3),
                                   (4, None, 0.8, 0.9), (5, 10, 1.0, 1.0), (6, None, 1.0, 1.2)]]
    jobs = [("Once upon", 25, s) for s in settings] + [("ROMEO:", 20, {}), ("abc", 30, {})]
    got = run_concurrently(server.base_url, jobs)
    for (p, n, kw), text in zip(jobs, got):
        kw = {"temperature": 0, **kw}
        assert text == generate_text(model, tok, p, n, **kw), kw
    assert len(set(got[:6])) == 6  # each row used its own seed


def test_stop_strings_per_request(server, loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    full = [generate_text(model, tok, p, 40, temperature=0) for p in ("Hello", "What light")]
    stops = [full[0][10:13], full[1][20:22]]
    got = run_concurrently(server.base_url, [("Hello", 40, {"stop": [stops[0]]}),
                                             ("What light", 40, {"stop": stops[1]}),
                                             ("Hello", 40, {})])
    assert got == [full[0][: full[0].index(stops[0])], full[1][: full[1].index(stops[1])], full[0]]


def test_long_prompt_prefills_in_chunks_between_decode_steps(loaded) -> None:  # noqa: ANN001
    """A 60-token prompt arriving while another job decodes is read 4 tokens at a time, with a
    decode step of the running job after each chunk: it never stalls the other job for long."""
    model, tok = loaded
    engine = Engine(model, tok, max_queue=0, max_batch=2, prefill_chunk=4)
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
    try:
        first_piece = threading.Event()
        a = Job("Hi", 40, sampling={"temperature": 0.0}, on_text=lambda _t: first_piece.set())
        fa = engine.try_submit(a)
        assert first_piece.wait(30)
        b = Job(WORDS[:60], 5, sampling={"temperature": 0.0})
        fb = engine.try_submit(b)
        fa.result(60), fb.result(60)
    finally:
        hook.remove()
        engine.shutdown()
    assert max(t for _, t in shapes) == 4  # no pass read more than one chunk
    chunks = [i for i, s in enumerate(shapes) if s == (1, 4)]
    assert len(chunks) == 15  # 60 tokens / 4
    between = [shapes[i + 1] for i in chunks[:-1]]
    assert all(s[1] == 1 for s in between), between  # a decode step after each chunk
    assert (2, 1) in shapes  # then both decoded in one batch
    assert a.text == generate_text(model, tok, "Hi", 40, temperature=0)
    assert b.text == generate_text(model, tok, WORDS[:60], 5, temperature=0)


def test_prompts_arriving_together_prefill_in_padded_passes(loaded) -> None:  # noqa: ANN001
    """Prompts of different lengths admitted at once are read together in left-padded passes
    of at most `prefill_chunk` tokens; each completion equals its single-request output."""
    model, tok = loaded
    engine = Engine(model, tok, max_queue=4, max_batch=4, prefill_chunk=64)
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
    # the longest fills the context of 96 exactly: pads' keys go to its slot-mates' last index
    texts, ns = ["a", "ROMEO: hi", (WORDS * 2)[:90], "Hello"], [10, 10, 6, 10]
    try:
        with engine._lock:  # hold the worker so that it admits all four in one turn
            jobs = [Job(t, n, sampling={"temperature": 0.0}) for t, n in zip(texts, ns)]
            futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(60)
    finally:
        hook.remove()
        engine.shutdown()
    # 64 prompt tokens per pass at most, taken oldest first: "a" and "ROMEO: hi" together,
    # then 64 of the 90, then its last 26 with "Hello" (decode steps in between)
    prefills = [sh for sh in shapes if sh[1] > 1]
    assert prefills == [(2, 9), (1, 64), (2, 26)], shapes
    assert [j.text for j in jobs] == [generate_text(model, tok, t, n, temperature=0)
                                      for t, n in zip(texts, ns)]


@pytest.mark.parametrize("slots, gathered", [(3, False), (5, True)])
def test_decode_reads_a_run_of_slots_as_one_view(loaded, slots: int, gathered: bool) -> None:  # noqa: ANN001
    """Jobs in slots 0 and slots-1, those in between done: a step over slots 0..2 (one dummy row,
    in the free slot 1) reads every layer's keys and values as a view of the cache; over 0..4
    (three dummies for two jobs) the two rows are gathered. Either way each job's tokens are
    those it gets alone."""
    model, tok = loaded
    engine = Engine(model, tok, max_queue=0, max_batch=slots, prefill_chunk=64)
    steps: list[tuple[int, bool]] = []  # (rows in the step, read as one view)
    step = engine._step

    def spy(ids, cache_pos, view, mask, positions):  # noqa: ANN001, ANN202
        steps.append((ids.shape[0], view[0].consecutive))
        return step(ids, cache_pos, view, mask, positions)

    engine._step = spy
    texts = ["ROMEO", *["Hi"] * (slots - 2), "What light"]
    ns = [20, *[2] * (slots - 2), 20]  # the middle ones end after two tokens
    try:
        with engine._lock:  # hold the worker so that it admits all of them in one turn
            jobs = [Job(t, n, sampling={"temperature": 0.0}) for t, n in zip(texts, ns)]
            futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(60)
    finally:
        engine.shutdown()
    # 19 decode steps (the first token comes from the prompt's pass); after the first, the
    # middle jobs have left and slots 0 and slots-1 generate
    assert steps[0] == (slots, True) and len(steps) == 19, steps
    assert set(steps[1:]) == {(2, False) if gathered else (slots, True)}, steps
    assert [j.text for j in jobs] == [reference_greedy(model, tok, t, n) for t, n in zip(texts, ns)]


def test_greedy_rows_take_one_batched_argmax(loaded, monkeypatch) -> None:  # noqa: ANN001
    """In a batch of greedy and sampled jobs only the sampled ones go through `sample` (one by
    one, each with its own generator); the greedy rows' tokens come from one argmax over the
    batch. Each job's text is still what it gets alone."""
    import bardlm.serve.engine as engine_module

    model, tok = loaded
    temperatures: list[float] = []
    real_sample = engine_module.sample

    def spy(logits, temperature, *args):  # noqa: ANN001, ANN002, ANN202
        temperatures.append(temperature)
        return real_sample(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "sample", spy)
    engine = Engine(model, tok, max_queue=0, max_batch=4)
    settings = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 3}, {"temperature": 0.0},
                {"temperature": 0.0, "repetition_penalty": 1.3}]  # a penalty: sampled alone
    try:
        with engine._lock:
            jobs = [Job("ROMEO", 12, sampling=s) for s in settings]
            futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(60)
    finally:
        engine.shutdown()
    assert sorted(set(temperatures)) == [0.0, 0.8]
    assert len(temperatures) == 2 * 12  # the sampled job and the penalised one, every token
    assert [j.text for j in jobs] == [generate_text(model, tok, "ROMEO", 12, **s) for s in settings]


def test_a_packed_fp32_model_in_a_batch_gives_each_request_its_tokens_alone(loaded) -> None:  # noqa: ANN001
    """`bardlm serve` loads fp32 models prepared for inference (FastLinear); a batching engine
    packs them for oneDNN (`pack_rows`). Concurrent greedy requests still give the
    tokens `generate_text` gives each alone on the unpacked model."""
    import copy

    from bardlm.infer.layouts import FastLinear, prepare_for_inference

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    model, tok = loaded
    plain = prepare_for_inference(copy.deepcopy(model), "fp32")
    packed = copy.deepcopy(plain)
    engine = Engine(packed, tok, max_queue=0, max_batch=4)
    pairs = [("ROMEO", 20), ("What light", 15), ("a", 25), ("Hello there", 18)]
    try:
        with engine._lock:  # admitted together: one batch
            jobs = [Job(p, n, sampling={"temperature": 0.0}) for p, n in pairs]
            futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(60)
    finally:
        engine.shutdown()
    layers = [m for m in packed.modules() if isinstance(m, FastLinear)]
    assert layers and all(m.packed is not None for m in layers)
    assert [j.text for j in jobs] == [generate_text(plain, tok, p, n, temperature=0) for p, n in pairs]


def test_echo_and_logprobs_in_a_busy_batch(server) -> None:  # noqa: ANN001
    base = server.base_url

    async def main() -> list:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            busy = [complete(c, p, n, True) for p, n in prompts(6)]
            scored = c.post("/v1/completions", json={"prompt": "ROMEO: what", "max_tokens": 0,
                                                     "echo": True, "logprobs": 2})
            return await asyncio.gather(scored, *busy)

    r = asyncio.run(main())[0]
    alone = httpx.post(f"{base}/v1/completions", json={"prompt": "ROMEO: what", "max_tokens": 0,
                                                        "echo": True, "logprobs": 2}).json()
    assert r.status_code == 200
    assert r.json()["choices"][0]["logprobs"] == alone["choices"][0]["logprobs"]
