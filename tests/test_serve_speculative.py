"""Speculative decoding in the server (`bardlm serve --draft`, serve/speculate.py): greedy replies
equal plain decoding's (one client alone, several at once, prompt lookup and a draft model),
sampled tokens follow the model's distribution (chi-square), a vanished client frees the draft,
and models whose cache cannot be rewound are refused in one line."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import CHARS, ThreadServer, make_checkpoint, wait_until  # noqa: E402
from spec_helpers import chi2_pvalue, perturbed  # noqa: E402

from bardlm import GPT, BardlmError, ModelConfig, cli, preset  # noqa: E402
from bardlm.infer.generate import generate_text  # noqa: E402
from bardlm.infer.speculative import target_probs  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from bardlm.serve import Engine, Job, build_app  # noqa: E402
from bardlm.tokenizers import CharTokenizer  # noqa: E402

# Prompts that repeat themselves (prompt lookup finds guesses), and ordinary ones.
PROMPTS = ["to be or not to be or not to be, ", "Hello", "abc abc abc abc ", "What light",
           "ROMEO: ROMEO: ROMEO:"]


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny models: one thread (thread start-up costs more than the work on 2 loaded cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    model, tok, _ = load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("spec") / "m"))
    return model.eval(), tok



def run(engine: Engine, jobs: list[Job]) -> list[str]:
    futures = [engine.try_submit(j) for j in jobs]
    return [f.result(120).text for f in futures]


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_replies_equal_plain_decoding(loaded, drafter: str) -> None:  # noqa: ANN001
    """One client alone speculates; then a long job speculates until three more join (a plain
    batch), and speculates again when it is left alone (the draft's owner changes in between).
    Every reply equals `generate_text`'s greedy one (stop strings and budgets included)."""
    model, tok = loaded
    draft = "ngram" if drafter == "ngram" else perturbed(model, 0.02, 0)
    engine = Engine(model, tok, max_batch=4, max_queue=4, draft=draft, draft_tokens=3)
    spec = engine.speculator
    want = {p: generate_text(model, tok, p, 60, temperature=0) for p in PROMPTS}
    try:
        alone = run(engine, [Job(PROMPTS[0], 60, sampling={"temperature": 0.0})])
        assert alone == [want[PROMPTS[0]]]
        assert spec.counts["accepted"] > 0, spec.counts  # guesses were kept: fewer passes
        first = spec.counts["rounds"]
        assert first < 60
        # A long job, joined by three once it has speculated, one of them stopping at a string.
        stop = want[PROMPTS[2]][5:8]
        started = threading.Event()
        long = Job(PROMPTS[1], 60, sampling={"temperature": 0.0}, on_text=lambda _t: started.set())
        f_long = engine.try_submit(long)
        assert started.wait(60)
        others = [Job(PROMPTS[2], 30, sampling={"temperature": 0.0}, stop=[stop]),
                  Job(PROMPTS[3], 12, sampling={"temperature": 0.0}),
                  Job(PROMPTS[4], 40, sampling={"temperature": 0.0})]
        got = run(engine, others)
        f_long.result(120)
        assert engine.stats()["peak_running"] == 4  # they really ran as one batch
    finally:
        engine.shutdown()
    assert long.text == want[PROMPTS[1]]
    assert got == [want[PROMPTS[2]][: want[PROMPTS[2]].index(stop)], want[PROMPTS[3]][:12],
                   want[PROMPTS[4]][:40]]
    assert spec.counts["rounds"] > first  # the later jobs speculated too
    assert spec.owner is None  # every job gave the draft up


def test_http_clients_at_once_and_alone_equal_plain(loaded) -> None:  # noqa: ANN001
    """Through the HTTP API: five concurrent clients, then one alone, with prompt lookup."""
    import asyncio

    model, tok = loaded
    app = build_app(model, tok, max_batch=8, max_queue=8, draft="ngram", draft_tokens=4)
    body = lambda p: {"prompt": p, "max_tokens": 40, "temperature": 0}  # noqa: E731
    with ThreadServer(app) as srv:
        async def main() -> list[str]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
                rs = await asyncio.gather(*(c.post("/v1/completions", json=body(p))
                                            for p in PROMPTS))
                return [r.json()["choices"][0]["text"] for r in rs]

        together = asyncio.run(main())
        alone = httpx.post(f"{srv.base_url}/v1/completions", json=body(PROMPTS[0]),
                           timeout=120).json()["choices"][0]["text"]
        rounds = app.state.engine.speculator.counts["rounds"]
    want = [generate_text(model, tok, p, 40, temperature=0) for p in PROMPTS]
    assert together == want
    assert alone == want[0]
    assert rounds > 0


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_sampled_tokens_follow_the_model(drafter: str) -> None:
    """The first two tokens of many seeded requests, each speculating alone, against the
    model's exact joint p(t1) p(t2 | t1) under the request's temperature and top-k. (The first
    token comes from the prompt's pass, the second from a verify pass of two guesses.)"""
    V, N = 6, 500
    tok = CharTokenizer("abcdef")
    torch.manual_seed(5)
    model = GPT(ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32,
                            bias=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # a peaked distribution, so guesses are often kept
    draft = "ngram" if drafter == "ngram" else perturbed(model, 0.3, 1)
    # The prompt whose continuation the model repeats most, so prompt lookup's guesses are kept.
    prompt = max(("a" * 8, "abcabcab", "fefefefe"), key=lambda s: generate_text(
        model, tok, s, 8, temperature=0).count(s[-1]))
    sampling = dict(temperature=1.5, top_k=3)  # top-k cuts real mass: p must apply it
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        p1 = target_probs(model(ids)[0][:, -1], top_p=None, min_p=None, **sampling)[0]
        rows = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = target_probs(model(rows)[0][:, -1], top_p=None, min_p=None, **sampling)
    joint = (p1[:, None] * p2).flatten()
    engine = Engine(model, tok, max_batch=1, max_queue=N, draft=draft, draft_tokens=3)
    try:
        jobs = [Job(prompt, 4, sampling={**sampling, "seed": s}) for s in range(N)]
        run(engine, jobs)
    finally:
        engine.shutdown()
    counts = torch.zeros(V * V)
    for j in jobs:
        t1, t2 = tok.encode(j.text)[:2]
        counts[t1 * V + t2] += 1
    assert engine.speculator.counts["accepted"] > N / 10  # not all from the fallback draw
    assert chi2_pvalue(counts, joint) > 1e-3


def test_a_vanished_client_frees_its_slot_and_the_draft(loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, max_queue=0, draft=perturbed(model, 0.02, 0))
    spec = engine.speculator
    try:
        job = Job(PROMPTS[0], 60, sampling={"temperature": 0.0})
        future = engine.try_submit(job)
        assert wait_until(lambda: spec.owner is not None and spec.drafter.n_cached > 0, 60)
        job.cancel.set()
        assert future.result(60).finish_reason == "cancelled"
        assert wait_until(lambda: engine.stats()["running"] == 0)
        assert spec.owner is None and spec.drafter.n_cached == 0
        assert engine._free == [0, 1]
        # The next request starts afresh in the draft and still equals plain decoding.
        assert run(engine, [Job(PROMPTS[3], 20, sampling={"temperature": 0.0})]) == [
            generate_text(model, tok, PROMPTS[3], 20, temperature=0)]
    finally:
        engine.shutdown()
    # The draft's cache is one slot's row of the engine's context, whatever max_batch is.
    assert spec.drafter.cache[0].k.shape[:3] == (1, model.config.n_head, engine.context)


def test_refusals(loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    lfm2 = GPT(preset("lfm2-tiny", vocab_size=tok.vocab_size)).eval()
    with pytest.raises(BardlmError, match="short-convolution layer cannot; drop --draft"):
        Engine(lfm2, tok, draft="ngram")
    local = GPT(preset("gemma3-tiny", vocab_size=tok.vocab_size)).eval()  # window 16 of 64
    with pytest.raises(BardlmError, match="ring buffer .16 positions.*--max-context 16"):
        Engine(local, tok, draft="ngram")
    Engine(local, tok, draft="ngram", max_context=16).shutdown()
    with pytest.raises(BardlmError, match="vocabulary"):
        Engine(model, tok, draft=GPT(preset("char-tiny", vocab_size=7)))
    with pytest.raises(BardlmError, match="--draft-tokens"):
        Engine(model, tok, draft="ngram", draft_tokens=0)


def test_cli_serve_refuses_a_draft_with_another_tokenizer(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    make_checkpoint(tmp_path / "m")
    other = CharTokenizer(sorted(set(CHARS) - {"q"}))
    save_checkpoint(tmp_path / "d", GPT(preset("char-tiny", vocab_size=other.vocab_size)), other, {})
    assert cli.main(["serve", "--ckpt", str(tmp_path / "m"), "--draft", str(tmp_path / "d"),
                     "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "must share the tokenizer" in err and "Traceback" not in err


def test_fp32_inference_layout_with_packed_weights(loaded) -> None:  # noqa: ANN001
    """An fp32 inference model (`prepare_for_inference`): the speculator packs its weights, so
    verify passes, prefills and batched steps (several rows) run on oneDNN's kernel and one-row
    steps on `x @ W^T`; replies still equal plain greedy decoding's, alone and together."""
    from bardlm.infer.layouts import can_pack_rows, prepare_for_inference

    model, tok = loaded
    fast = prepare_for_inference(copy.deepcopy(model), "fp32")
    engine = Engine(fast, tok, max_batch=4, max_queue=4, draft="ngram")
    try:
        alone = run(engine, [Job(PROMPTS[0], 40, sampling={"temperature": 0.0})])
        together = run(engine, [Job(p, 30, sampling={"temperature": 0.0}) for p in PROMPTS[1:]])
    finally:
        engine.shutdown()
    assert (fast.lm_head.packed is not None) == can_pack_rows()
    assert alone == [generate_text(model, tok, PROMPTS[0], 40, temperature=0)]
    assert together == [generate_text(model, tok, p, 30, temperature=0) for p in PROMPTS[1:]]
