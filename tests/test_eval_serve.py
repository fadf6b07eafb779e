"""`logprobs` and `echo` on /v1/completions, and lm-eval's local-completions model evaluating a
running server: its numbers equal the direct model's (`BardlmLM`, and the scorer)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import ThreadServer, make_checkpoint  # noqa: E402

from bardlm.eval.score import score_rows  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.serve import build_app  # noqa: E402

NAME = "tiny-char"
PROMPT = "ROMEO: what light"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):  # noqa: ANN201
    return make_checkpoint(tmp_path_factory.mktemp("evalserve") / NAME)


@pytest.fixture(scope="module")
def server(ckpt):  # noqa: ANN001, ANN201
    model, tok, _ = load_checkpoint(ckpt)
    with ThreadServer(build_app(model, tok, model_name=NAME, max_queue=4)) as srv:
        yield srv, model, tok


def post(srv, **body) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.post(f"{srv.base_url}/v1/completions", json={"model": NAME, **body}, timeout=60)


def test_echo_logprobs_of_the_prompt(server) -> None:  # noqa: ANN001
    srv, model, tok = server
    r = post(srv, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT and "".join(lp["tokens"]) == PROMPT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == list(range(len(PROMPT)))  # one character per token
    want = score_rows(model, [tok.encode(PROMPT)], [1])[0].logprobs.tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert all(len(t) == 3 and max(t.values()) >= v - 1e-6
               for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    assert len(set(round(v, 3) for v in want)) > 3  # varied values: a shift would show


def test_logprobs_of_a_greedy_completion(server) -> None:  # noqa: ANN001
    srv, model, tok = server
    r = post(srv, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1).json()["choices"][0]
    lp, text = r["logprobs"], r["text"]
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == 8
    assert lp["text_offset"] == list(range(8))
    ids = tok.encode(PROMPT + text)
    want = score_rows(model, [ids], [len(ids) - 8])[0]
    assert lp["token_logprobs"] == pytest.approx(want.logprobs.tolist(), abs=1e-5)
    assert bool(want.greedy.all())  # greedy tokens are their own top-1 alternative
    assert [max(t.values()) for t in lp["top_logprobs"]] == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_token_prompts_and_tokenizer_endpoints(server) -> None:  # noqa: ANN001
    srv, _, tok = server
    ids = httpx.post(f"{srv.base_url}/tokenize", json={"prompt": PROMPT}, timeout=10).json()["tokens"]
    assert ids == tok.encode(PROMPT)
    back = httpx.post(f"{srv.base_url}/detokenize", json={"tokens": ids}, timeout=10).json()
    assert back["prompt"] == PROMPT
    a = post(srv, prompt=[ids], max_tokens=0, echo=True, logprobs=0).json()["choices"][0]
    b = post(srv, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0).json()["choices"][0]
    assert a["logprobs"]["token_logprobs"] == b["logprobs"]["token_logprobs"]
    assert httpx.get(f"{srv.base_url}/tokenizer_info", timeout=10).json()["max_model_len"] == 96


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "max_tokens": 0}, None),  # nothing to return without echo
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": 2, "stream": True}, None),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": [5, 9999]}, "prompt"),
    ({"prompt": "x" * 96, "max_tokens": 1}, "prompt"),  # no room left to generate
])
def test_bad_logprob_requests_are_400(server, body, param) -> None:  # noqa: ANN001
    r = post(server[0], **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
    if param:
        assert r.json()["error"]["param"] == param


def test_lm_eval_local_completions_equals_direct_model(server, ckpt) -> None:  # noqa: ANN001
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'bardlm[eval]'")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from bardlm.eval.harness import BardlmLM

    srv = server[0]
    pairs = [("ROMEO: what light", " through yonder"), ("The cat sat on the", " mat"),
             ("What is the capital of France?", " Paris"), ("She said: ", "no!"),
             ("A", " bird sang in the tree")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    remote = LocalCompletionsAPI(base_url=f"{srv.base_url}/v1/completions", model=NAME,
                                 tokenizer_backend="remote", max_length=95, max_retries=1)
    got = remote.loglikelihood(reqs)
    want = BardlmLM(ckpt=str(ckpt)).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5) and ga == gb
    assert len({round(b, 2) for b, _ in want}) == len(want)
