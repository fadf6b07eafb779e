"""Continuous batching of a linear-attention hybrid (qwen3.5-tiny: three gated delta rule layers
to one attention layer), random weights: each slot keeps a fixed state (conv inputs and the
delta rule's matrices), so requests that run together, in reused slots, must still give the
tokens each gives alone. The reference re-reads the whole sequence every step (no cache)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from serve_helpers import CHARS, ThreadServer, reference_greedy, wait_until  # noqa: E402
from test_serve_batch import WORDS, run_concurrently  # noqa: E402

from bardlm import GPT  # noqa: E402
from bardlm.config import preset  # noqa: E402
from bardlm.nn.cache import StateCache  # noqa: E402
from bardlm.serve import Engine, Job, build_app  # noqa: E402
from bardlm.tokenizers import CharTokenizer  # noqa: E402


@pytest.fixture(scope="module", params=["qwen3.5-tiny", "lfm2-tiny"])
def hybrid(request) -> tuple[GPT, CharTokenizer]:  # noqa: ANN001
    """qwen3.5-tiny (gated delta rule) or lfm2-tiny (short convolutions, a conv-only state) over
    CHARS, weights scaled up so greedy output is varied."""
    tok = CharTokenizer(CHARS)
    torch.manual_seed(35)
    model = GPT(preset(request.param, vocab_size=tok.vocab_size, block_size=96))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval(), tok


def states(engine: Engine, slot: int) -> list[torch.Tensor]:
    return [t[slot] for c in engine.cache if isinstance(c, StateCache) for t in (c.conv, c.state)]


def test_concurrent_requests_of_different_lengths_equal_each_alone(hybrid) -> None:  # noqa: ANN001
    """10 greedy requests, prompts of 1 to 66 characters (up to three 32-token chunks), over 4
    slots: the first pass waits until all are queued, so prompts of different lengths are
    admitted, and read, together, and most slots serve two or three requests in turn."""
    model, tok = hybrid
    timed = GPT(model.config).eval()
    timed.load_state_dict(model.state_dict())
    gate = threading.Event()

    def hold(_m, _a) -> None:  # noqa: ANN001
        gate.wait(30)
        time.sleep(0.002)  # so that requests overlap

    timed.register_forward_pre_hook(hold)
    app = build_app(timed, tok, model_name="hybrid", max_batch=4, max_queue=12, prefill_chunk=32)
    engine = app.state.engine
    lengths = [3, 8, 1, 5, 66, 2, 7, 40, 4, 6]  # short ones share a pass (32 tokens at most)
    pairs = [(WORDS[:n], 4 + (5 * i) % 17) for i, n in enumerate(lengths)]
    got: dict[str, list[str]] = {}
    with ThreadServer(app) as srv:
        client = threading.Thread(target=lambda: got.update(
            texts=run_concurrently(srv.base_url, [(p, n, {}) for p, n in pairs])))
        client.start()
        assert wait_until(lambda: engine.accepted == len(pairs), timeout=30)  # running + queued
        gate.set()
        client.join(120)
        assert wait_until(lambda: engine.stats()["running"] == 0)
    assert engine.stats()["peak_running"] == 4  # they really shared the batch
    assert got["texts"] == [reference_greedy(model, tok, p, n) for p, n in pairs]


def test_a_reused_slot_starts_from_zero_and_is_zeroed_when_its_request_ends(hybrid) -> None:  # noqa: ANN001
    """One slot: a long request, then a short one in the same slot, then one whose client
    leaves mid-way. Each finished or cancelled request leaves the slot's state zeroed; the
    second request's tokens are those it gets alone."""
    model, tok = hybrid
    engine = Engine(model, tok, max_queue=2, max_batch=1, prefill_chunk=16)
    try:
        first = Job(WORDS[:50], 20, sampling={"temperature": 0.0})
        engine.try_submit(first).result(60)
        assert all(not t.any() for t in states(engine, 0))
        second = Job("Hi", 15, sampling={"temperature": 0.0})
        engine.try_submit(second).result(60)
        assert second.text == reference_greedy(model, tok, "Hi", 15)
        assert first.text == reference_greedy(model, tok, WORDS[:50], 20)
        started = threading.Event()
        gone = Job("ROMEO", 60, sampling={"temperature": 0.0}, on_text=lambda _t: started.set())
        future = engine.try_submit(gone)
        assert started.wait(30)
        gone.cancel.set()  # the client went away
        assert future.result(60).finish_reason == "cancelled"
        assert all(not t.any() for t in states(engine, 0))
    finally:
        engine.shutdown()


def test_a_parked_dummy_token_leaves_a_slots_state_alone(hybrid) -> None:  # noqa: ANN001
    """The all-slots step of a compiled server gives an idle or half-prefilled slot a dummy token
    at the last cache index: that row's state must not change (the others' must)."""
    model, _ = hybrid
    cache = model.make_cache(2, 96)
    for c in cache:
        if isinstance(c, StateCache):
            c.conv.normal_()
            c.state.normal_()
    # (a conv-only state, LFM2's, has an empty `state`: nothing there to move)
    before = [t.clone() for c in cache if isinstance(c, StateCache) for t in (c.conv, c.state) if t.numel()]
    with torch.no_grad():
        model(torch.tensor([[5], [6]]), start_pos=torch.tensor([[10], [95]]),
              cache=[c.rows([0, 1], 96) for c in cache])
    after = [t for c in cache if isinstance(c, StateCache) for t in (c.conv, c.state) if t.numel()]
    for b, a in zip(before, after):
        assert a[1].equal(b[1])  # the parked row
        assert not a[0].equal(b[0])  # the real row moved on


def test_speculative_decoding_still_refuses_a_hybrid(hybrid) -> None:  # noqa: ANN001
    from bardlm import BardlmError
    from bardlm.infer.speculative import generate_speculative

    model, _ = hybrid
    with pytest.raises(BardlmError, match="rewinds the cache"):
        generate_speculative(model, torch.tensor([[1, 2, 3]]), 4)


def test_prompts_of_different_lengths_prefill_in_unpadded_passes(hybrid) -> None:  # noqa: ANN001
    """Prompts admitted in one turn are read in one pass per chunk length, never padded."""
    model, tok = hybrid
    engine = Engine(model, tok, max_queue=4, max_batch=4, prefill_chunk=64)
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
    texts = ["ab", "ROMEO: hi", "Hello", "ROMEO: yo"]
    try:
        with engine._lock:  # hold the worker so that it admits all four in one turn
            jobs = [Job(t, 6, sampling={"temperature": 0.0}) for t in texts]
            futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(60)
    finally:
        hook.remove()
        engine.shutdown()
    assert [j.text for j in jobs] == [reference_greedy(model, tok, t, 6) for t in texts]
    assert [sh for sh in shapes if sh[1] > 1][:3] == [(1, 2), (2, 9), (1, 5)], shapes
