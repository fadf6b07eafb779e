"""Run the app under uvicorn on a socket we bind ourselves.

Binding first (rather than letting uvicorn do it) turns "port in use" into a one-line
`BardlmError`, and lets tests ask for port 0 and read back the free port the OS chose.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import BardlmError
from .app import build_app

LOOPBACK = "127.0.0.1"


def bind(host: str = LOOPBACK, port: int = 8000) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise BardlmError(f"port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BardlmError(f"cannot resolve host {host!r} ({e}); pass an IP address to --host") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise BardlmError(f"cannot listen on {host}:{port} ({e.strerror}); "
                          "pick another --port or stop the program using it") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head.

    uvicorn closes a keep-alive connection that stays silent, but any byte resets that timer,
    and a new connection has none: a client trickling a header a byte at a time holds a
    connection for ever. Here a client has `head_timeout` seconds, from connecting or from its
    previous response, to finish a request line and headers; the body has its own stall limit
    (app.py). One timer per connection, checked when it fires.
    """

    head_timeout = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        in_request = self.cycle is not None and not self.cycle.response_complete
        if not in_request and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


def uvicorn_config(app: Any, log_level: str = "info", max_connections: int = 256,
                   head_timeout: float = 10.0) -> uvicorn.Config:
    """uvicorn's settings for a server facing untrusted clients.

    max_connections: connections plus requests in progress; past it uvicorn answers 503 at
    once. timeout_keep_alive: an idle keep-alive connection is closed after 5 s. head_timeout:
    seconds a client has to send a request's head (`HeadDeadline`). The h11 limit caps a
    request's headers at 16 KiB; the body has its own size and stall limits (app.py).
    """
    protocol = type("Protocol", (HeadDeadline,), {"head_timeout": head_timeout})
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                          timeout_keep_alive=5, limit_concurrency=max_connections,
                          h11_max_incomplete_event_size=16 * 1024, server_header=False,
                          proxy_headers=False, http=protocol)


def allowed_hosts_for(host: str, extra: list[str] | None = None) -> list[str] | None:
    """The Host header names a server bound to `host` answers to: loopback names for a
    loopback bind, the address itself otherwise, plus `extra`; None (any) for a wildcard bind
    (0.0.0.0 or ::) with no `extra`, where the names cannot be known."""
    if host in ("0.0.0.0", "::", ""):
        return list(extra) if extra else None
    names = ["localhost", "127.0.0.1", "::1", host] if is_loopback(host) else [host]
    return names + list(extra or [])


def serve_app(app: Any, sock: socket.socket, log_level: str = "info", max_connections: int = 256) -> None:
    """Serve `app` on an already bound socket until interrupted (blocks)."""
    config = uvicorn_config(app, log_level, max_connections)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raises Ctrl-C
        print("bardlm: server stopped", file=sys.stderr, flush=True)


def serve(ckpt: str | Path, host: str = LOOPBACK, port: int = 8000, device: str = "cpu",
          max_queue: int = 16, model_name: str | None = None, log_level: str = "info",
          max_batch: int = 8, api_key: str | None = None, allowed_hosts: list[str] | None = None,
          max_connections: int = 256, docs: bool = False, compile: bool = False,
          dtype: str | None = "fp32", max_context: int | None = None) -> None:
    """Load a checkpoint and serve it on http://host:port until interrupted (blocks).

    max_batch: requests generated together (each holds one KV cache row, a slot);
    max_context: positions per slot (default: the model's context, or as many as half the
    memory available holds, divided among the slots: infer/budget.py);
    api_key: require `Authorization: Bearer <api_key>`; allowed_hosts: extra names for the
    Host header (beyond those of `host`); docs: serve /docs and /openapi.json; dtype: the
    inference layout (fp32, bf16, int8; None: the weights as saved).
    """
    from ..io.load import load

    model, tokenizer = load(ckpt, dtype, device=device)
    if tokenizer is None:
        raise BardlmError(f"{ckpt} has no tokenizer.json; the server needs it to read prompts")
    name = model_name or Path(ckpt).resolve().name
    from ..io.metadata import template_for

    app = build_app(model, tokenizer, model_name=name, max_queue=max_queue, max_batch=max_batch,
                    api_key=api_key, allowed_hosts=allowed_hosts_for(host, allowed_hosts),
                    docs=docs, compile=compile, chat_template=template_for(ckpt, tokenizer),
                    max_context=max_context)
    sock = bind(host, port)
    where = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{where[1]}"
    print(f"bardlm: serving {name!r} at {url}/v1 (playground: {url}/); "
          f"{app.state.engine.plan.describe()}", file=sys.stderr, flush=True)
    if not is_loopback(host) and not api_key:
        print(f"bardlm: warning: {host} is reachable from other machines and the API has no "
              "authentication; pass --api-key", file=sys.stderr, flush=True)
    serve_app(app, sock, log_level, max_connections)
