"""Serve a model over HTTP: an OpenAI-compatible completions API and a browser playground.

    from bardlm.serve import serve
    serve("runs/char-tiny", host="127.0.0.1", port=8000)   # blocks; Ctrl-C stops it

`build_app(model, tokenizer)` gives the FastAPI app itself (for tests or another ASGI server).
Needs the `serve` extra: `pip install "bardlm[serve]"` (fastapi and uvicorn).
"""

from __future__ import annotations

from ..errors import BardlmError

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # one line with the fix, not a traceback
    raise BardlmError(
        f"serving needs fastapi and uvicorn ({e}); install them: pip install \"bardlm[serve]\""
    ) from None

from .app import build_app  # noqa: E402
from .engine import Engine, Job  # noqa: E402
from .server import bind, serve, serve_app, uvicorn_config  # noqa: E402

__all__ = ["build_app", "Engine", "Job", "bind", "serve", "serve_app", "uvicorn_config"]
