"""The HTTP server, driven by the official `openai` client and by raw HTTP.

References: greedy text from a plain argmax loop over the model (no cache, no generate.py),
`generate_text` for seeded sampling, and the `bardlm generate` command itself.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
openai = pytest.importorskip("openai", reason="these tests drive the server with the openai client")
httpx = pytest.importorskip("httpx")

from serve_helpers import ThreadServer, make_checkpoint, reference_greedy, wait_until  # noqa: E402

from bardlm.errors import BardlmError  # noqa: E402
from bardlm.infer.generate import generate_text  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.serve import bind, build_app  # noqa: E402

NAME = "tiny-char"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / NAME)


@pytest.fixture(scope="module")
def loaded(ckpt: Path):  # noqa: ANN201
    model, tok, _ = load_checkpoint(ckpt)
    return model, tok


@pytest.fixture(scope="module")
def server(loaded):  # noqa: ANN001, ANN201
    model, tok = loaded
    with ThreadServer(build_app(model, tok, model_name=NAME, max_queue=4)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ThreadServer):  # noqa: ANN201
    # max_retries=0: the client would otherwise silently retry a 503
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="not-needed", max_retries=0,
                         timeout=60)


def health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health", timeout=10).json()


# Plain and streamed completions ------------------------------------------------------------
def test_models_and_health(client, server) -> None:  # noqa: ANN001
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].max_model_len == 96
    assert client.models.retrieve(NAME).id == NAME
    h = health(server.base_url)
    assert h["status"] == "ok" and h["model"] == NAME and h["capacity"] == 5


def test_greedy_completion_matches_reference(client, loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    prompt = "ROMEO: "
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    expected = reference_greedy(model, tok, prompt, 40)
    assert len(set(expected)) > 5  # a varied continuation, so a shifted text could not pass
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 40, 47)
    assert r.model == NAME and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_greedy_equals_bardlm_generate(client, ckpt, capsys) -> None:  # noqa: ANN001
    from bardlm.cli import main

    prompt = "To be, or not"
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "50"]) == 0
    cli_out = capsys.readouterr().out
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=50, temperature=0)
    assert cli_out == prompt + r.choices[0].text + "\n"


def test_stream_matches_plain(client) -> None:  # noqa: ANN001
    kw = dict(model=NAME, prompt="Hello there", max_tokens=30, temperature=0)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 5  # really streamed in pieces, not one blob
    assert "".join(texts) == plain.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].choices == []
    assert len({c.id for c in chunks}) == 1


def test_stop_string_ends_the_completion(client, loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    prompt = "Hello there"
    full = reference_greedy(model, tok, prompt, 40)
    stop = full[15:18]
    want = full[: full.index(stop)]
    kw = dict(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "@never@"])
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_echo_returns_prompt_too(client) -> None:  # noqa: ANN001
    kw = dict(model=NAME, prompt="Hi", max_tokens=5, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw, echo=True).choices[0].text == "Hi" + plain


def test_seeded_sampling_matches_generate_text(client, loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    kw = dict(temperature=1.0, top_p=0.9)
    api = dict(model=NAME, prompt="Once", max_tokens=30, seed=123, extra_body={"top_k": 20}, **kw)
    a, b = client.completions.create(**api), client.completions.create(**api)
    want = generate_text(model, tok, "Once", 30, seed=123, top_k=20, **kw)
    assert a.choices[0].text == b.choices[0].text == want
    other = generate_text(model, tok, "Once", 30, seed=124, top_k=20, **kw)
    assert other != want  # the seed reaches the sampler (so the equality above means something)


def test_top_k_one_is_greedy(client, loaded) -> None:  # noqa: ANN001
    model, tok = loaded
    r = client.completions.create(model=NAME, prompt="abc", max_tokens=20, temperature=1.5,
                                  extra_body={"top_k": 1}, seed=7)
    assert r.choices[0].text == reference_greedy(model, tok, "abc", 20)


# Validation: OpenAI-style 4xx errors, never a crash ------------------------------------------
BAD = [
    (b"{not json", 400, None),
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"max_tokens": 5}', 400, "prompt"),
    (b'{"prompt": 7}', 400, "prompt"),
    (b'{"prompt": ["a", "b"]}', 400, "prompt"),
    (b'{"prompt": ""}', 400, "prompt"),
    (b'{"prompt": "\xe2\x82\xac uro"}', 400, "prompt"),  # a character outside the vocabulary
    (json.dumps({"prompt": "a" * 96}).encode(), 400, "prompt"),  # fills the whole context
    (b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 95}', 400, "max_tokens"),  # 2 + 95 > 96
    (b'{"prompt": "hi", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 2.5}', 400, "max_tokens"),
    (b'{"prompt": "hi", "temperature": -0.1}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": 2.5}', 400, "temperature"),
    (b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "hi", "top_k": 0}', 400, "top_k"),
    (b'{"prompt": "hi", "top_k": 1000}', 400, "top_k"),  # more than the vocabulary
    (b'{"prompt": "hi", "stop": ""}', 400, "stop"),
    (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "hi", "stop": 3}', 400, "stop"),
    (b'{"prompt": "hi", "seed": "x"}', 400, "seed"),
    (b'{"prompt": "hi", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "hi", "max_token": 5}', 400, "max_token"),  # misspelt: refused, not ignored
    (b'{"prompt": "hi", "n": 2}', 400, None),
    (b'{"prompt": "hi", "logprobs": 21}', 400, "logprobs"),  # at most 20 alternatives
    (b'{"prompt": "hi", "model": "gpt-4"}', 404, "model"),
    (json.dumps({"prompt": "a" * (2 << 20)}).encode(), 413, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_errors(server, body: bytes, status: int, param) -> None:  # noqa: ANN001
    r = httpx.post(f"{server.base_url}/v1/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]


def test_errors_surface_in_the_openai_client(client, server) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError, match="ask for at most"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    r = httpx.get(f"{server.base_url}/no/such/route", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert health(server.base_url)["status"] == "ok"


# Queue, 503 and disconnects (a slowed-down model on a server with one waiting slot) ----------
@pytest.fixture
def slow_server(ckpt: Path):  # noqa: ANN201
    model, tok, _ = load_checkpoint(ckpt)
    # 20 ms per forward pass: long enough that requests overlap, without any test-only knob
    model.register_forward_pre_hook(lambda _m, _a: time.sleep(0.02))
    with ThreadServer(build_app(model, tok, model_name=NAME, max_queue=1)) as srv:
        yield srv


def _open_stream(base_url: str, max_tokens: int) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(base_url=base_url, timeout=30)
    req = c.build_request("POST", "/v1/completions", json={
        "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": True})
    return c, c.send(req, stream=True)


def test_full_queue_answers_503_at_once_and_disconnects_free_slots(slow_server) -> None:  # noqa: ANN001
    base = slow_server.base_url
    engine = slow_server.app.state.engine
    (c1, r1), (c2, r2) = _open_stream(base, 90), _open_stream(base, 90)
    try:
        assert r1.status_code == r2.status_code == 200
        assert wait_until(lambda: health(base)["running"] == 1 and health(base)["queued"] == 1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=NAME, prompt="Hi", max_tokens=3)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "queue_full"
        # "At once": refused while the first job was still running, not after waiting for it.
        assert health(base)["running"] == 1 and engine.completed == 0
        first = next(r1.iter_lines())
        assert first.startswith("data: ")
    finally:  # both clients hang up mid-stream
        r1.close(), c1.close(), r2.close(), c2.close()
    assert wait_until(lambda: health(base)["running"] == 0 and health(base)["queued"] == 0)
    h = health(base)
    assert h["cancelled"] == 2 and h["completed"] == 0
    assert h["tokens_generated"] < 90  # the running job stopped early; the waiting one never ran
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200  # the slots are free again


def test_non_streaming_client_that_leaves_cancels_its_job(slow_server) -> None:  # noqa: ANN001
    base = slow_server.base_url
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 80},
                   timeout=httpx.Timeout(30, read=0.3))
    assert wait_until(lambda: health(base)["cancelled"] == 1 and health(base)["running"] == 0)
    assert health(base)["tokens_generated"] < 80


# Binding and the command line ----------------------------------------------------------------
def test_port_in_use_is_a_one_line_error() -> None:
    held = bind("127.0.0.1", 0)
    try:
        with pytest.raises(BardlmError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", held.getsockname()[1])
    finally:
        held.close()


def test_cli_serve_missing_checkpoint(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from bardlm.cli import main

    assert main(["serve", "--ckpt", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_playground_page_is_self_contained(server) -> None:  # noqa: ANN001
    page = httpx.get(f"{server.base_url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    from bardlm.serve.app import STATIC

    for f in STATIC.iterdir():  # nothing fetched from other origins: no CDN, no fonts
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
        if f.name != "index.html":
            assert httpx.get(f"{server.base_url}/static/{f.name}", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/static/..%2Fapp.py", timeout=10).status_code == 404


def test_engine_runs_one_job_at_a_time(loaded) -> None:  # noqa: ANN001
    """Jobs from several threads at once give the same texts as run alone (no shared state)."""
    from bardlm.serve import Engine, Job

    model, tok = loaded
    engine = Engine(model, tok, max_queue=8)
    prompts = ["a", "bb", "Hello", "ROMEO", "x y z"]
    jobs = [Job(p, 12, sampling={"temperature": 0.0}) for p in prompts]
    futures: list = []
    threads = [threading.Thread(target=lambda j=j: futures.append(engine.try_submit(j)))
               for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in futures:
        f.result(timeout=60)
    engine.shutdown()
    assert [j.text for j in jobs] == [reference_greedy(model, tok, p, 12) for p in prompts]
    assert engine.stats()["tokens_generated"] == 12 * len(prompts)



def test_missing_fastapi_is_a_one_line_error(monkeypatch) -> None:  # noqa: ANN001
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    for name in [m for m in sys.modules if m.startswith("bardlm.serve")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(BardlmError, match=r'pip install "bardlm\[serve\]"'):
        importlib.import_module("bardlm.serve")
