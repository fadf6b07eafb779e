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


def serve_app(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on an already bound socket until interrupted (blocks)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raises Ctrl-C
        print("bardlm: server stopped", file=sys.stderr, flush=True)


def serve(ckpt: str | Path, host: str = LOOPBACK, port: int = 8000, device: str = "cpu",
          max_queue: int = 16, model_name: str | None = None, log_level: str = "info") -> None:
    """Load a checkpoint and serve it on http://host:port until interrupted (blocks)."""
    from ..io.load import load

    model, tokenizer = load(ckpt, device=device)
    if tokenizer is None:
        raise BardlmError(f"{ckpt} has no tokenizer.json; the server needs it to read prompts")
    name = model_name or Path(ckpt).resolve().name
    from ..infer.chat import template_for

    app = build_app(model, tokenizer, model_name=name, max_queue=max_queue,
                    chat_template=template_for(ckpt, tokenizer))
    sock = bind(host, port)
    where = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{where[1]}"
    print(f"bardlm: serving {name!r} at {url}/v1 (playground: {url}/)", file=sys.stderr, flush=True)
    if not is_loopback(host):
        print(f"bardlm: warning: {host} is reachable from other machines and the API has no "
              "authentication", file=sys.stderr, flush=True)
    serve_app(app, sock, log_level)
