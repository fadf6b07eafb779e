"""The server in front of untrusted clients: limits, validation, clean errors, auth, Host check."""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
openai = pytest.importorskip("openai", reason="these tests drive the server with the openai client")
httpx = pytest.importorskip("httpx")

from serve_helpers import ThreadServer, make_checkpoint, wait_until  # noqa: E402

from bardlm.errors import BardlmError  # noqa: E402
from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.serve import build_app, uvicorn_config  # noqa: E402
from bardlm.serve import server as server_mod  # noqa: E402
from bardlm.serve.app import MAX_BODY, BodyLimits  # noqa: E402
from bardlm.serve.server import allowed_hosts_for  # noqa: E402

NAME = "tiny-hard"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return make_checkpoint(tmp_path_factory.mktemp("hard") / NAME)


@pytest.fixture(scope="module")
def loaded(ckpt):  # noqa: ANN001, ANN201
    model, tok, _ = load_checkpoint(ckpt)
    return model, tok


@pytest.fixture(scope="module")
def server(loaded):  # noqa: ANN001, ANN201
    with ThreadServer(build_app(*loaded, model_name=NAME, max_batch=4)) as srv:
        yield srv


def raw(port: int, request: bytes, sock: socket.socket | None = None) -> tuple[bytes, bytes, socket.socket]:
    """Send `request` on a (kept) socket; read one response: (head, body, socket)."""
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(request)
    head, _, body = read_answer(s).partition(b"\r\n\r\n")
    assert head, "the server closed the connection without an answer"
    return head, body, s


def post_bytes(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_chunked_body_is_refused_at_the_limit_without_reading_it_whole(server) -> None:  # noqa: ANN001
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b'{"prompt": "' + b"a" * (64 * 1024)
    # Just past MAX_BODY, and the body never ends (no final 0-length chunk). Sending more than
    # the server reads races its close: the unread bytes make the kernel answer with a reset.
    for _ in range(MAX_BODY // len(piece) + 1):
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (ConnectionResetError, BrokenPipeError):
            break  # the server has already refused; its answer is waiting to be read
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    s.close()
    assert data.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in data.lower()


@pytest.mark.parametrize("field,value", [("seed", 18446744073709551616), ("seed", -1),
                                         ("repetition_penalty", 1e-38),
                                         ("repetition_penalty", 1e38)])
def test_out_of_range_values_are_400s(server, field: str, value) -> None:  # noqa: ANN001
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=30, json={
        "prompt": "hi", "max_tokens": 5, "temperature": 0.8, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_internal_error_is_a_clean_500_and_the_connection_lives_on(loaded, monkeypatch) -> None:  # noqa: ANN001
    app = build_app(*loaded, model_name=NAME)
    engine = app.state.engine

    def broken(job) -> None:  # noqa: ANN001
        raise RuntimeError("secret internals")

    with ThreadServer(app) as srv:
        good = json.dumps({"prompt": "hi", "max_tokens": 3, "temperature": 0}).encode()
        monkeypatch.setattr(engine, "check", broken)
        head, body, s = raw(srv.port, post_bytes(good))
        assert head.startswith(b"HTTP/1.1 500") and b"connection: close" not in head.lower()
        err = json.loads(body)["error"]
        assert err["type"] == "server_error"
        assert "RuntimeError" not in err["message"] and "secret" not in err["message"]
        monkeypatch.undo()
        head, body, s = raw(srv.port, post_bytes(good), s)  # the same keep-alive connection
        assert head.startswith(b"HTTP/1.1 200"), head
        s.close()


def test_post_needs_json_content_type(server) -> None:  # noqa: ANN001
    r = httpx.post(f"{server.base_url}/v1/completions", content=b'{"prompt": "hi"}',
                   headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = httpx.post(f"{server.base_url}/v1/completions", content=b'{"prompt": "hi"}', timeout=30)
    assert r.status_code == 415


def test_host_header_must_name_this_server(server) -> None:  # noqa: ANN001
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    r = httpx.get(f"{server.base_url}/v1/models", headers={"Host": "evil.example:8000"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert httpx.get(f"{server.base_url}/v1/models", headers={"Host": host}).status_code == 200
    assert allowed_hosts_for("10.0.0.5", ["box.lan"]) == ["10.0.0.5", "box.lan"]


def test_api_key(loaded) -> None:  # noqa: ANN001
    with ThreadServer(build_app(*loaded, model_name=NAME, api_key=KEY)) as srv:
        base = srv.base_url
        assert httpx.get(f"{base}/v1/models").status_code == 401
        r = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/health").status_code == 200  # liveness and the page stay open
        assert httpx.get(f"{base}/").status_code == 200
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
        assert ok.completions.create(model=NAME, prompt="hi", max_tokens=2).choices[0].text
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=NAME, prompt="hi", max_tokens=2)


def test_docs_are_off_by_default(server, loaded) -> None:  # noqa: ANN001
    assert httpx.get(f"{server.base_url}/docs").status_code == 404
    assert httpx.get(f"{server.base_url}/openapi.json").status_code == 404
    app = build_app(*loaded, docs=True)
    assert app.openapi_url == "/openapi.json"
    app.state.engine.shutdown()


def test_uvicorn_limits() -> None:
    cfg = uvicorn_config(object(), max_connections=64)
    assert cfg.http.max_connections == 64 and cfg.timeout_keep_alive == 5
    assert cfg.h11_max_incomplete_event_size == 16 * 1024


def test_a_trickled_request_head_is_cut(loaded) -> None:  # noqa: ANN001
    """Slow loris: one byte of header every 0.1 s never completes a request; the connection is
    closed at the head deadline, while a prompt client on the same server is served."""
    app = build_app(*loaded, model_name=NAME)
    with ThreadServer(app, uvicorn_config(app, "warning", head_timeout=0.5)) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\n")
        t0, closed = time.monotonic(), False
        while time.monotonic() - t0 < 5:
            try:
                s.sendall(b"X")
                time.sleep(0.1)
            except OSError:
                closed = True
                break
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        s.close()
        assert closed and time.monotonic() - t0 < 3
        assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200


def test_the_head_deadline_counts_from_the_last_response(loaded) -> None:  # noqa: ANN001
    """A keep-alive client's deadline for its next head starts at its previous response: the
    timer of an earlier request must not cut it."""
    app = build_app(*loaded, model_name=NAME)
    with ThreadServer(app, uvicorn_config(app, "warning", head_timeout=2.0)) as srv:
        get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        head, _, s = raw(srv.port, get)  # t = 0: the first request's timer fires at 2 s
        time.sleep(1.2)
        head, _, s = raw(srv.port, get, s)  # t = 1.2: the next head is due by 3.2 s
        s.sendall(get[:20])
        time.sleep(1.4)  # t = 2.6: past the first timer, within the second
        head, _, s = raw(srv.port, get[20:], s)
        s.close()
        assert head.startswith(b"HTTP/1.1 200")


def test_big_prompts_are_tokenised_off_the_event_loop(server) -> None:  # noqa: ANN001
    """16 prompts of ~1 MiB at once: /health keeps answering quickly meanwhile."""
    base = server.base_url
    body = json.dumps({"prompt": "a" * 1_000_000, "max_tokens": 1}).encode()
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", content=body,
                                               headers={"Content-Type": "application/json"})
                                        for _ in range(16)))
            return [r.status_code for r in rs]

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        codes = asyncio.run(flood())
    finally:
        done.set()
        poller.join()
    assert codes == [400] * 16  # far longer than the context
    print(f"/health latency during the flood: max {max(latencies) * 1e3:.0f} ms over {len(latencies)}")
    # ~100 ms on an idle machine; the bound is loose for shared CPUs.
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


def slow_post(port: int, length: int = 100_000) -> socket.socket:
    """A connection that sent a completion request's head and the first byte of its body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
              f"\r\nContent-Length: {length}\r\n\r\n{{".encode())
    return s


def closed(s: socket.socket) -> bool:
    """Whether the server has answered or closed `s` (without waiting)."""
    readable, _, _ = select.select([s], [], [], 0)
    return bool(readable)


def read_answer(s: socket.socket) -> bytes:
    """One whole answer on `s`, head and body: they can arrive in separate packets."""
    data = b""
    while b"\r\n\r\n" not in data and (more := s.recv(65536)):
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    while len(body) < length and (more := s.recv(65536)):
        body += more
    return head + b"\r\n\r\n" + body if head else b""


def trickle(port: int, piece: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send a body `piece` every `every` seconds until the server answers (or `limit` passes):
    (its whole answer, seconds it took to start)."""
    s, t0 = slow_post(port), time.monotonic()
    try:
        while time.monotonic() - t0 < limit:
            if select.select([s], [], [], every)[0]:
                took = time.monotonic() - t0
                return read_answer(s), took
            s.sendall(piece)
        return b"", time.monotonic() - t0
    finally:
        s.close()


def test_slow_bodies_do_not_shut_out_prompt_clients(loaded) -> None:  # noqa: ANN001
    """Slow-body DoS: as many connections as allowed each hold a half-sent body (long deadlines,
    so only the making of room can help), and the attacker reconnects whenever one is closed;
    prompt clients are still served, each in the room of the longest-waiting slow body."""
    app = build_app(*loaded, model_name=NAME, body_limits=BodyLimits(deadline=600, grace=600))
    limit = 24
    with ThreadServer(app, uvicorn_config(app, "warning", max_connections=limit)) as srv:
        slow = [slow_post(srv.port) for _ in range(limit)]
        try:
            for i in range(6):
                assert wait_until(lambda: len(srv.server.server_state.connections) == limit)
                r = httpx.post(f"{srv.base_url}/v1/completions", timeout=30,
                               json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
                assert r.status_code == 200, r.text
                assert wait_until(lambda s=slow[i]: closed(s), 5)  # the oldest made room
                slow.append(slow_post(srv.port))  # and comes back at once
            assert not any(closed(s) for s in slow[6:])
        finally:
            for s in slow:
                s.close()


def test_a_slow_body_is_cut_at_its_minimum_rate_and_its_deadline(loaded) -> None:  # noqa: ANN001
    limits = BodyLimits(deadline=1.5, grace=0.3, min_rate=1000)
    app = build_app(*loaded, model_name=NAME, body_limits=limits)
    with ThreadServer(app, uvicorn_config(app, "warning")) as srv:
        # 20 bytes/s: far under the minimum rate, cut soon after the grace, before the deadline
        status, took = trickle(srv.port, b" ", every=0.05, limit=10)
        assert status.startswith(b"HTTP/1.1 408") and took < 1.2, (status, took)
        assert b"the request body came too slowly" in status and b"1000 bytes/s" in status
        # 4,000 bytes/s: fast enough, but 100 kB will not be whole by the deadline
        status, took = trickle(srv.port, b" " * 400, every=0.1, limit=10)
        assert status.startswith(b"HTTP/1.1 408") and 1.4 < took < 3, (status, took)
        r = httpx.post(f"{srv.base_url}/v1/completions", timeout=30,
                       json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


def test_a_client_hanging_up_mid_body_logs_one_line(server, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.INFO, logger="bardlm.serve"):
        s = slow_post(server.port)
        time.sleep(0.2)
        s.close()
        assert wait_until(lambda: any(r.name == "bardlm.serve" for r in caplog.records), 5)
        time.sleep(0.2)
    records = [r for r in caplog.records if r.name.startswith("bardlm")]
    assert len(records) == 1 and records[0].exc_info is None, [r.getMessage() for r in records]
    assert "closed during the body of POST /v1/completions (1 of 100000 bytes" in records[0].getMessage()


@pytest.mark.parametrize("body,status,message", [
    (b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400, "nested too deeply"),
    (b'{"prompt": "caf\xe9"}', 400, "not UTF-8 (bad byte at offset 15)"),
    (b'{"prompt": "hi"', 400, "not valid JSON"),
    (b'{"prompt": 3}', 400, "prompt must be a string"),
], ids=["nested", "latin-1", "cut-off", "not-a-string"])
def test_tokenize_says_what_is_wrong_with_a_body(server, body: bytes, status: int, message: str) -> None:  # noqa: ANN001
    r = httpx.post(f"{server.base_url}/tokenize", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_tokenize_refuses_an_oversize_body_as_such(server) -> None:  # noqa: ANN001
    head, body, s = raw(server.port, b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                        b"application/json\r\nContent-Length: 2000000\r\n\r\n{")
    s.close()
    assert head.startswith(b"HTTP/1.1 413") and b"over 1 MiB" in body, body


def test_request_heads_over_16_kib_are_refused(server) -> None:  # noqa: ANN001
    def get(pad: int) -> bytes:
        head, body, s = raw(server.port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            f"X-Pad: {'a' * pad}\r\n\r\n".encode())
        s.close()
        return head.split(b"\r\n", 1)[0] + b" " + body

    assert get(60_000).startswith(b"HTTP/1.1 431"), get(60_000)  # sent in one piece
    assert get(15_000).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_bind_keeps_the_host_check(loaded, host: str) -> None:  # noqa: ANN001
    """DNS rebinding against a server bound to every address: only the machine's own names,
    its addresses and --allowed-host names are answered."""
    names = allowed_hosts_for(host, ["box.lan"])
    me = socket.gethostname().lower()
    assert {"localhost", "127.0.0.1", me, "box.lan"} <= set(names)
    assert "evil.example" not in names
    with ThreadServer(build_app(*loaded, model_name=NAME, allowed_hosts=names)) as srv:
        for ok in (f"{me}:8000", "box.lan", "127.0.0.1:8000"):
            assert httpx.get(f"{srv.base_url}/v1/models", headers={"Host": ok}).status_code == 200
        r = httpx.get(f"{srv.base_url}/v1/models", headers={"Host": "evil.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"


def test_serve_on_a_wildcard_says_which_hosts_it_answers(ckpt, monkeypatch, capsys) -> None:  # noqa: ANN001
    def started(app, sock, *args) -> None:  # noqa: ANN001
        sock.close()
        app.state.engine.shutdown()

    monkeypatch.setattr(server_mod, "serve_app", started)
    server_mod.serve(ckpt, host="0.0.0.0", port=0, allowed_hosts=["box.lan"])
    err = capsys.readouterr().err
    assert "requests must name this machine in their Host header" in err
    assert socket.gethostname().lower() in err and "box.lan" in err


def test_max_connections_must_be_positive(ckpt, monkeypatch, capsys) -> None:  # noqa: ANN001
    from bardlm.cli import main

    def started(*args) -> None:  # noqa: ANN002
        raise AssertionError("the server started with --max-connections 0")

    monkeypatch.setattr(server_mod, "serve_app", started)
    assert main(["serve", "--ckpt", str(ckpt), "--port", "0", "--max-connections", "0"]) == 2
    assert "--max-connections must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(BardlmError, match="max-connections"):
        uvicorn_config(object(), max_connections=0)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_non_finite_temperatures_are_400s(server, route: str, value: bytes) -> None:  # noqa: ANN001
    what = b'"prompt": "hi"' if route == "/v1/completions" else b'"messages": [{"role": "user", "content": "hi"}]'
    r = httpx.post(f"{server.base_url}{route}", timeout=30, headers={"Content-Type": "application/json"},
                   content=b"{" + what + b', "max_tokens": 2, "temperature": ' + value + b"}")
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
