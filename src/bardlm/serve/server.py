"""Run the app under uvicorn on a socket we bind ourselves.

Binding first (rather than letting uvicorn do it) turns "port in use" into a one-line
`BardlmError`, and lets tests ask for port 0 and read back the free port the OS chose.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import BardlmError
from .app import LOOPBACK_NAMES, MAX_HEAD, build_app

LOOPBACK = "127.0.0.1"
LOG = logging.getLogger("bardlm.serve")


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


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head, and room kept for
    requests that arrive whole.

    Head deadline: uvicorn closes a keep-alive connection that stays silent, but any byte
    resets that timer, and a new connection has none: a client trickling a header a byte at a
    time would hold a connection for ever. Here a client has `head_timeout` seconds, from
    connecting or from its previous response, to finish a request line and headers; the body
    has its own deadline and minimum rate (app.py, `BodyLimits`).

    Room: at most `max_connections` connections are open. One more arriving at the limit
    closes the connection that has been *waiting* longest (for a head or for the rest of a
    body, or idle between requests); connections holding a whole request (being answered,
    streaming) are never closed. So clients that trickle bodies delay nobody who sends
    requests promptly: they are the oldest waiting, and go first. Only when every connection
    holds a whole request is the new one turned away (uvicorn's 503).
    """

    head_timeout = 10.0
    max_connections = 256

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._waiting_since: float | None = None
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        waiting = [c for c in self.connections if c is not self
                   and getattr(c, "_waiting_since", None) is not None
                   and not c.transport.is_closing()]
        if not waiting:  # all busy: this one stays, and uvicorn answers its request with a 503
            return
        victim = min(waiting, key=lambda c: c._waiting_since)
        client = victim.client
        LOG.warning("%d connections open, the limit: closed %s, which waited %.0f s for its "
                    "request", len(self.connections) - 1, f"{client[0]}:{client[1]}" if client
                    else "a client", self.loop.time() - victim._waiting_since)
        victim.transport.close()  # a body being read: the app sees the disconnect (one line)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            self._waiting_since = None  # a whole request in hand: real work, never evicted

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()  # the previous request's timer must not cut this one
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        in_request = self.cycle is not None and not self.cycle.response_complete
        if not in_request and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


def check_max_connections(max_connections: int) -> None:
    """Refuse a connection limit under 1 (0 would turn every client away), before loading."""
    if max_connections < 1:
        raise BardlmError(f"--max-connections must be at least 1, got {max_connections}; it bounds "
                          "the open connections (default 256)")


def uvicorn_config(app: Any, log_level: str = "info", max_connections: int = 256,
                   head_timeout: float = 10.0) -> uvicorn.Config:
    """uvicorn's settings for a server facing untrusted clients.

    max_connections: open connections at most (`GuardedProtocol` makes room for a new one by
    closing the longest waiting; uvicorn's own limit, one above, counts requests in progress
    and answers 503 past it). timeout_keep_alive: an idle keep-alive connection is closed after
    5 s. head_timeout: seconds a client has to send a request's head. The h11 limit caps a
    request head arriving in pieces at 16 KiB (Guard, app.py, one arriving at once); the body
    has its own size and time limits (app.py).
    """
    check_max_connections(max_connections)
    protocol = type("Protocol", (GuardedProtocol,),
                    {"head_timeout": head_timeout, "max_connections": max_connections})
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                          timeout_keep_alive=5, limit_concurrency=max_connections + 1,
                          h11_max_incomplete_event_size=MAX_HEAD, server_header=False,
                          proxy_headers=False, http=protocol)


WILDCARDS = ("0.0.0.0", "::", "")


def machine_names() -> list[str]:
    """This machine's names and addresses: loopback, host name, FQDN, what they resolve to, and
    every interface address (Linux: ioctl for IPv4, /proc/net/if_inet6 for IPv6)."""
    names = list(LOOPBACK_NAMES)
    for name in {socket.gethostname(), socket.getfqdn()}:
        names.append(name)
        try:
            names += [info[4][0] for info in socket.getaddrinfo(name, None)]
        except OSError:
            pass  # a host name that does not resolve: its addresses come from the interfaces
    names += _interface_addresses()
    return list(dict.fromkeys(n.lower().split("%")[0] for n in names if n))


def _interface_addresses() -> list[str]:
    found = []
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                         struct.pack("256s", name.encode()[:15]))
                    found.append(socket.inet_ntoa(packed[20:24]))
                except OSError:
                    pass  # an interface without an IPv4 address
    except (ImportError, OSError, AttributeError):
        pass  # not Linux: the resolved addresses above are what we have
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def allowed_hosts_for(host: str, extra: list[str] | None = None) -> list[str]:
    """The Host header names a server bound to `host` answers to, plus `extra`: loopback names
    for a loopback bind; the address itself otherwise; for a wildcard bind (0.0.0.0 or ::),
    this machine's own names and addresses (`machine_names`). Never "any": a page elsewhere
    that rebinds its DNS name to this machine sends its own name, and is refused."""
    if host in WILDCARDS:
        names = machine_names()
    elif is_loopback(host):
        names = [*LOOPBACK_NAMES, host]
    else:
        names = [host]
    return list(dict.fromkeys([*names, *(extra or [])]))


def host_rule(host: str, names: list[str]) -> str:
    """The start-up line saying which Host headers a wildcard-bound server answers to."""
    return (f"bardlm: bound to {host or '0.0.0.0'} (every address): requests must name this machine in "
            f"their Host header ({', '.join(names)}); add other names with --allowed-host")


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
          dtype: str | None = "fp32", max_context: int | None = None,
          draft: str | None = None, draft_tokens: int = 4) -> None:
    """Load a checkpoint and serve it on http://host:port until interrupted (blocks).

    max_batch: requests generated together (each holds one KV cache row, a slot);
    max_context: positions per slot (default: the model's context, or as many as half the
    memory available holds, divided among the slots: infer/budget.py);
    api_key: require `Authorization: Bearer <api_key>`; allowed_hosts: extra names for the
    Host header (beyond those of `host`); docs: serve /docs and /openapi.json; dtype: the
    inference layout (fp32, bf16, int8; None: the weights as saved); draft: a draft model
    directory (same tokenizer) or "ngram", to decode speculatively with `draft_tokens` guesses
    while one request is generating (serve/speculate.py).
    """
    from ..io.load import load, load_draft

    check_max_connections(max_connections)
    model, tokenizer = load(ckpt, dtype, device=device)
    if tokenizer is None:
        raise BardlmError(f"{ckpt} has no tokenizer.json; the server needs it to read prompts")
    drafter = None if draft is None else load_draft(draft, tokenizer, dtype, device)
    name = model_name or Path(ckpt).resolve().name
    from ..io.load import read_meta
    from ..io.metadata import template_for

    hosts = allowed_hosts_for(host, allowed_hosts)
    app = build_app(model, tokenizer, model_name=name, max_queue=max_queue, max_batch=max_batch,
                    api_key=api_key, allowed_hosts=hosts,
                    docs=docs, compile=compile, chat_template=template_for(ckpt, tokenizer),
                    max_context=max_context, draft=drafter, draft_tokens=draft_tokens,
                    sampling_defaults=read_meta(ckpt, tokenizer).sampling_defaults())
    sock = bind(host, port)
    where = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{where[1]}"
    print(f"bardlm: serving {name!r} at {url}/v1 (playground: {url}/); "
          f"{app.state.engine.plan.describe()}", file=sys.stderr, flush=True)
    if host in WILDCARDS:
        print(host_rule(host, hosts), file=sys.stderr, flush=True)
    if not is_loopback(host) and not api_key:
        print(f"bardlm: warning: {host} is reachable from other machines and the API has no "
              "authentication; pass --api-key", file=sys.stderr, flush=True)
    serve_app(app, sock, log_level, max_connections)
