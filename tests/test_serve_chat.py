"""POST /v1/chat/completions, through the `openai` client: OpenAI's shapes, whole and streamed;
the reply equals a `ChatSession` reply (same template, greedy) and stops at the end of the turn."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
openai = pytest.importorskip("openai")

from serve_helpers import ThreadServer, make_checkpoint  # noqa: E402

from bardlm.infer.chat import ChatSession  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.io.metadata import template_for  # noqa: E402
from bardlm.serve import build_app  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_chat_completions_openai_client(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny")
    model, tok, _ = load_checkpoint(ckpt)
    template = template_for(ckpt, tok)
    session = ChatSession(model, tok, template, system="Be brief.", max_new_tokens=20, temperature=0.0)
    expected = session.reply("Hello there")
    with ThreadServer(build_app(model, tok, model_name="tiny", chat_template=template)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none")
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 20 and r.usage.prompt_tokens > 0
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20,
                                                temperature=0, stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="role 'robot'"):
            client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])


def test_chat_reply_ends_at_end_of_turn(tmp_path: Path) -> None:
    """A stop string inside the reply: finish_reason stop, the text cut before it (the end of
    the turn works the same way, being one more stop string)."""
    ckpt = make_checkpoint(tmp_path / "tiny")
    model, tok, _ = load_checkpoint(ckpt)
    template = template_for(ckpt, tok)
    full = ChatSession(model, tok, template, max_new_tokens=30, temperature=0.0).reply("Hi")
    assert len(full) > 3
    stop = full[2:4]
    with ThreadServer(build_app(model, tok, model_name="tiny", chat_template=template)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none")
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=30, temperature=0, stop=[stop])
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == full[: full.find(stop)]
