"""An OpenAI-compatible HTTP API and the playground page, as a FastAPI app.

    POST /v1/completions   prompt -> completion, whole or streamed as server-sent events
    POST /v1/chat/completions  messages -> the assistant's reply (the model's chat template
                           renders them into a prompt; then it is a completion job like any other)
    GET  /v1/models        the one model served (id, context length)
    GET  /health           liveness, slot and queue counters
    GET  /                 the playground (static/index.html, no external resources)

Requests are parsed here and checked by the engine; every refusal is an OpenAI-style error
`{"error": {"message", "type", "param", "code"}}` with a 4xx status, and 503 when the queue is
full. The app only translates between HTTP and `Engine`; generation lives in the library.

In front of every route (`Guard`): the Host header must be one of the server's names (DNS
rebinding), an optional API key (Bearer), JSON content type on POST (415), and any unexpected
error becomes a 500 that names no exception and keeps the connection usable; a request head
over MAX_HEAD is refused (431). Bodies are counted while they arrive (413 at MAX_BODY) and
must arrive whole within a deadline and at a minimum rate (408, `BodyLimits`); parsing and
tokenising run on a small thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import BardlmError
from ..tokenizers.base import check_ids
from .engine import Engine, Job, RequestError

LOG = logging.getLogger("bardlm.serve")
STATIC = Path(__file__).parent / "static"
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 20  # alternatives per token: bounded work and response size
MAX_BODY = 1 << 20  # bytes; far more than any prompt that fits a context, far less than a DoS
MAX_HEAD = 16 * 1024  # bytes of request line and headers (what uvicorn's h11 limit allows a
# head arriving in pieces; a head arriving in one read escapes that limit, so Guard counts too)
MAX_SEED = 2**63 - 1
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_STOP_CHARS = 1000  # per stop string: each is searched for at every token
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# OpenAI options bardlm does not implement, and the one value of each that means "off".
NEUTRAL = {"n": 1, "best_of": 1, "suffix": None, "presence_penalty": 0,
           "frequency_penalty": 0, "logit_bias": {}}
# The page loads only its own files; nothing from other origins, ever.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields, plus top_k, min_p, repetition_penalty.

    Strict types (no "0.5" for 0.5) and unknown fields refused: a misspelt option is an error,
    not a silently ignored one. OpenAI fields we do not implement are accepted only at their
    neutral values (n=1, logprobs=null, ...).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: Any  # a string, or a list holding one string (checked below)
    max_tokens: int | None = Field(16, ge=0)  # 0: score the prompt only (with echo)
    # Unset (None): the model's generation_config.json default, else OpenAI's (`sampling_of`).
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    # Bounded so that dividing or multiplying a logit by it stays finite (1e-38 made inf - inf).
    repetition_penalty: float | None = Field(None, ge=MIN_PENALTY, le=MAX_PENALTY)
    stop: Any = None  # a string or a list of up to 4 strings (checked below)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # what a torch generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None
    # OpenAI fields we accept only at their neutral values (NEUTRAL):
    n: Any = None
    best_of: Any = None
    suffix: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        """One prompt: a string, or token ids (what lm-eval sends), maybe in a list of one."""
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]
        is_ids = isinstance(v, list) and all(type(i) is int for i in v)
        if not isinstance(v, str) and not is_ids:
            raise ValueError("must be a string or a list of token ids (one prompt; batches are not supported)")
        if not v:
            raise ValueError("must not be empty; give at least one character of text")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else [] if v is None else None
        if stops is None or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence may be at most {MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _neutral(self) -> CompletionRequest:
        for name, ok in NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value != ok:
                raise ValueError(f"{name}={value!r} is not supported by bardlm; leave it out")
        return self


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions: OpenAI's fields that bardlm implements."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_PENALTY, le=MAX_PENALTY)
    stop: Any = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    _stops = field_validator("stop")(CompletionRequest._stops.__func__)

    @model_validator(mode="after")
    def _neutral(self) -> ChatRequest:
        for name in ("n", "presence_penalty", "frequency_penalty", "logit_bias"):
            value = getattr(self, name)
            if value is not None and value != NEUTRAL[name]:
                raise ValueError(f"{name}={value!r} is not supported by bardlm; leave it out")
        return self


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One line from pydantic's errors: the first problem, and the field it concerns."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]  # e.g. ["stream_options", "include_usage"]
    param = loc[0] if loc else None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})", None
    if err["type"] == "model_type" or err["type"] == "model_attributes_type":
        return "the request body must be a JSON object", None
    if err["type"] == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}; check its spelling (see the OpenAI completions API)", param
    if err["type"] == "missing":
        return f"{'.'.join(loc)} is required", param
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), param


OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}  # the API's defaults


def sampling_of(req: Any, model_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sampler settings of a completion or chat request (same fields in both): each field
    the request leaves out takes the model's generation_config.json default
    (`ModelMeta.sampling_defaults`), else the OpenAI API's."""
    model_defaults = model_defaults or {}
    out: dict[str, Any] = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(req, key)
        if value is None:
            value = model_defaults.get(key)
        out[key] = value if value is not None else OPENAI_SAMPLING.get(key)
    return {**out, "seed": req.seed}


@dataclass(frozen=True)
class BodyLimits:
    """How long a client may take to send a request body (the head has its own deadline, server.py).

    A body must be whole within `deadline` seconds of its head, and, after `grace` seconds,
    have arrived at `min_rate` bytes per second on average: a client sending a byte now and
    then is cut within seconds, not at the deadline, and one that stops is cut at the same
    point. Real clients send a body in one go; the slowest allowed (1 MiB in 30 s) is ~35 KB/s.
    """

    deadline: float = 30.0
    grace: float = 5.0
    min_rate: float = 1024.0  # bytes per second

    def time_left(self, elapsed: float, received: int) -> float:
        """Seconds until the body is late, given `received` bytes after `elapsed` seconds."""
        return min(self.deadline, self.grace + received / self.min_rate) - elapsed


def build_app(model: Any, tokenizer: Any, model_name: str = "bardlm", max_queue: int = 16,
              max_batch: int = 1, api_key: str | None = None,
              allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES, docs: bool = False,
              prefill_chunk: int = 128, compile: bool = False,
              chat_template: Any = None, max_context: int | None = None,
              body_limits: BodyLimits = BodyLimits(),
              sampling_defaults: dict[str, Any] | None = None,
              draft: Any = None, draft_tokens: int = 4) -> FastAPI:
    """A FastAPI app serving `model` (a GPT, in eval mode) and its tokenizer.

    max_batch: requests generated together (continuous batching); max_queue: more that may wait.
    api_key: when set, every API route wants `Authorization: Bearer <api_key>`.
    allowed_hosts: host names the Host header may carry (None: any); the default, loopback
    names only, stops a web page on another site from reaching the server through DNS
    rebinding. docs: serve /docs and /openapi.json. chat_template: an `infer.chat.ChatTemplate`
    (default: the built-in one for the tokenizer) renders chats. max_context: KV cache
    positions per slot (default: sized to the memory available, `Engine`). body_limits: how
    fast a request body must arrive (`BodyLimits`). sampling_defaults: the model's sampler
    defaults (`ModelMeta.sampling_defaults`), for the fields a request leaves out. draft: a
    draft model or "ngram" (speculative decoding, `Engine`), with `draft_tokens` guesses.
    """
    engine = Engine(model, tokenizer, max_queue=max_queue, max_batch=max_batch,
                    prefill_chunk=prefill_chunk, compile=compile, max_context=max_context,
                    draft=draft, draft_tokens=draft_tokens)
    # Parsing and tokenising run here, off the event loop. Two threads: more would only fight
    # the event loop (and the generation thread) for the GIL.
    prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bardlm-parse")

    async def loop_free(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(prep_pool, fn, *args)

    async def read_and_prepare(request: Request, prepare: Callable[[bytes], Any]) -> Any:
        """The request's body read (bounded) and parsed by `prepare` off the event loop: its
        result, or the error response of either step."""
        body = await read_body(request)
        return body if isinstance(body, Response) else await loop_free(prepare, body)

    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()
        prep_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="bardlm", lifespan=lifespan, docs_url="/docs" if docs else None,
                  openapi_url="/openapi.json" if docs else None, redoc_url=None)
    app.state.engine = engine
    app.state.body_limits = body_limits
    app.state.sampling_defaults = dict(sampling_defaults or {})
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # no paths, only names
        if name not in files:
            return error_response(404, f"no static file {name!r}", code="not_found")
        return FileResponse(files[name], headers={"Content-Security-Policy": CSP})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "bardlm",
                "max_model_len": engine.context}

    # The tokenizer endpoints lm-eval's local-completions model uses (tokenizer_backend=remote),
    # so a client counts context tokens with the server's own tokenizer, whatever its kind.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"eos_token": None, "bos_token": None, "pad_token": None,
                "kind": getattr(tokenizer, "kind", None), "vocab_size": tokenizer.vocab_size,
                "max_model_len": engine.context}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            return error_response(400, "prompt must be a string", param="prompt")
        try:
            ids = await loop_free(tokenizer.encode, text)
        except BardlmError as e:
            return error_response(400, str(e), param="prompt")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.context})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            return error_response(400, "tokens must be a list of token ids", param="tokens")
        try:
            check_ids(ids, tokenizer.vocab_size)
        except BardlmError as e:
            return error_response(400, str(e), param="tokens")
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> Response:
        if name != model_name:
            return _unknown_model(name, model_name)
        return JSONResponse(model_card())

    def prepare(body: bytes) -> tuple[CompletionRequest, Job] | JSONResponse:
        """Parse, check and tokenise a request body (in a worker thread: a 1 MiB prompt takes
        a while to tokenise, and the event loop must keep answering everyone else)."""
        try:
            req = CompletionRequest.model_validate_json(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            return error_response(400, message, param=param)
        if req.model is not None and req.model != model_name:
            return _unknown_model(req.model, model_name)
        if req.max_tokens == 0 and not req.echo:
            return error_response(400, "max_tokens=0 returns nothing without echo=true; ask for "
                                  "at least 1 token, or echo the prompt", param="max_tokens")
        if req.logprobs is not None and req.stream:
            return error_response(400, "logprobs are not streamed by bardlm; pass stream=false",
                                  param="logprobs")
        ids = req.prompt if isinstance(req.prompt, list) else None
        if ids is not None:
            try:
                check_ids(ids, engine.model.config.vocab_size)
                prompt = engine.tokenizer.decode(ids)
            except BardlmError as e:
                return error_response(400, str(e), param="prompt")
        else:
            prompt = req.prompt
        job = Job(prompt=prompt, prompt_ids=ids, logprobs=req.logprobs, echo=req.echo,
                  max_tokens=16 if req.max_tokens is None else req.max_tokens, stop=req.stop or [],
                  sampling=sampling_of(req, app.state.sampling_defaults))
        try:
            engine.check(job)
        except RequestError as e:
            return error_response(400, str(e), param=e.param)
        return req, job

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        prepared = await read_and_prepare(request, prepare)
        if isinstance(prepared, Response):
            return prepared
        req, job = prepared
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            return _stream(engine, job, meta, req)
        ended = await _run_to_end(request, engine, job)
        if ended is not None:
            return ended
        text = job.prompt + job.text if req.echo else job.text
        choice = {**_choice(text, job.finish_reason), "logprobs": job.logprob_block}
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(job)})

    def prepare_chat(body: bytes) -> tuple[ChatRequest, Job] | JSONResponse:
        """Parse a chat body, render its messages and check the job (in a worker thread)."""
        from ..infer.chat import builtin_template, check_messages, prompt_ids

        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            return error_response(400, message, param=param)
        if req.model is not None and req.model != model_name:
            return _unknown_model(req.model, model_name)
        template = chat_template or builtin_template(tokenizer)
        try:
            messages = check_messages(req.messages)
            ids = prompt_ids(template, tokenizer, messages)
        except BardlmError as e:
            return error_response(400, str(e), param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # OpenAI's default: as much as the context leaves
            max_tokens = max(1, engine.context - len(ids))
        # The end of the turn is one more stop string: the reply ends there, without it.
        job = Job(prompt=tokenizer.decode(ids), prompt_ids=ids, max_tokens=max_tokens,
                  stop=[*(req.stop or []), template.end],
                  sampling=sampling_of(req, app.state.sampling_defaults))
        try:
            engine.check(job)
        except RequestError as e:
            return error_response(400, str(e), param="messages" if e.param == "prompt" else e.param)
        return req, job

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        prepared = await read_and_prepare(request, prepare_chat)
        if isinstance(prepared, Response):
            return prepared
        req, job = prepared
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            meta["object"] = "chat.completion.chunk"
            return _stream(engine, job, meta, req, _chat_chunk)
        ended = await _run_to_end(request, engine, job)
        if ended is not None:
            return ended
        choice = {"index": 0, "message": {"role": "assistant", "content": job.text},
                  "logprobs": None, "finish_reason": job.finish_reason}
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(job)})

    return app


def _chat_chunk(text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    """A chat stream's choice: the first carries the role, the last only the finish reason."""
    delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class Guard:
    """ASGI middleware in front of every route: Host check, API key, JSON content type, and a
    clean 500 for any unexpected error.

    The 500 is sent here, and the error not re-raised: an exception that reaches uvicorn after
    a response makes it drop the connection, and a keep-alive client then finds its next
    request failing with no `Connection: close` to warn it.
    """

    OPEN = ("/", "/health")  # the playground page must load to ask for a key

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.api_key = api_key
        self.hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:  # a half-sent response cannot become a 500: let uvicorn cut it
                raise
            LOG.exception("error while handling %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal error while handling this request (the "
                                      "server log has the details); try again", "server_error")
            await response(scope, receive, send)

    def refusal(self, scope: dict) -> JSONResponse | None:
        # Request line and headers as sent, give or take their spacing.
        head = (len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope["query_string"])
                + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + 16)
        if head > MAX_HEAD:
            return error_response(431, f"the request head is about {head} bytes, over the "
                                  f"{MAX_HEAD >> 10} KiB limit; send fewer or shorter headers",
                                  code="head_too_large", headers={"Connection": "close"})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return error_response(
                400, f"the Host header {headers.get('host', '')!r} is not a name of this server "
                f"(allowed: {', '.join(sorted(self.hosts))}); start it with --allowed-host to "
                "add one", code="bad_host")
        path = scope["path"]
        if self.api_key and path not in self.OPEN and not path.startswith("/static/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.api_key.encode()):
                return error_response(401, "this server needs an API key: send the header "
                                      "'Authorization: Bearer <key>'", "authentication_error",
                                      code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error_response(415, "send the request body as JSON with the header "
                                      f"'Content-Type: application/json' (got {ctype or 'none'!r})",
                                      code="unsupported_media_type",
                                      headers={"Connection": "close"})
        return None


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'; lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def read_body(request: Request) -> bytes | Response:
    """The request body, counted while it arrives: refused (413) as soon as it passes MAX_BODY,
    without reading the rest (a chunked upload has no Content-Length to check first), and
    refused (408) when it comes too slowly for the app's `BodyLimits`. A connection that closes
    mid-body (the client hung up, or server.py made room) is one log line, and an empty 499 that
    nobody reads."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        return _too_large()
    limits: BodyLimits = request.app.state.body_limits
    chunks, n = [], 0
    pieces = request.stream().__aiter__()
    start = time.monotonic()
    while True:
        try:
            left = limits.time_left(time.monotonic() - start, n)
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(pieces.__anext__(), left)
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            return error_response(
                408, f"the request body came too slowly ({n} byte{'s' * (n != 1)} in "
                f"{time.monotonic() - start:.1f} s); "
                f"send it whole, within {limits.deadline:.0f} s and at {limits.min_rate:.0f} bytes/s at "
                "least", code="body_timeout", headers={"Connection": "close"})
        except ClientDisconnect:
            client = request.client
            LOG.info("%s: the connection closed during the body of %s %s (%d of %s bytes received)",
                     f"{client.host}:{client.port}" if client else "client", request.method,
                     request.url.path, n, length or "?")
            return Response(status_code=499)
        n += len(chunk)
        if n > MAX_BODY:
            return _too_large()
        chunks.append(chunk)


async def read_json(request: Request) -> Any:
    """The JSON body of a request, or the error response saying why there is none (too large,
    too slow, not UTF-8, not JSON, nested too deeply)."""
    body = await read_body(request)
    if isinstance(body, Response):
        return body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return error_response(400, f"the request body is not UTF-8 (bad byte at offset {e.start}); "
                              "send JSON encoded as UTF-8")
    try:
        return json.loads(text)
    except ValueError as e:
        return error_response(400, f"the request body is not valid JSON ({e})")
    except RecursionError:
        return error_response(400, "the request body is not valid JSON (nested too deeply); send "
                              "a flat JSON object")


async def _run_to_end(request: Request, engine: Engine, job: Job) -> Response | None:
    """Submit a non-streaming `job` and wait for it to finish. Returns the response to send
    instead of a reply: 503 when the queue is full, 499 when the client left (nobody reads
    it, and its slot is already free); None when the job finished and its reply is due."""
    future = engine.try_submit(job)
    if future is None:
        return _busy(engine)
    try:
        await _wait_unless_gone(request, future, job)
    except asyncio.CancelledError:
        job.cancel.set()
        raise
    if job.finish_reason == "cancelled":
        return Response(status_code=499)
    return None


async def _wait_unless_gone(request: Request, future: Future, job: Job) -> None:
    """Wait for a job, cancelling it if the client disconnects first (checked every 0.1 s)."""
    waiter = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=0.1)
        if done:
            waiter.result()  # re-raise a worker exception (-> 500)
            return
        if await request.is_disconnected():
            job.cancel.set()


def _stream(engine: Engine, job: Job, meta: dict[str, Any], req: Any,
            chat_choice: Any = None) -> Response:
    """Queue a job whose text pieces flow to the client as OpenAI completion chunks (SSE);
    with `chat_choice` (text or None for the opening -> choice), as chat completion chunks."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None marks the end of the job

    def put(item: str | None) -> None:  # from the worker thread
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            job.cancel.set()

    job.on_text = put
    future = engine.try_submit(job)
    if future is None:
        return _busy(engine)
    future.add_done_callback(lambda _f: put(None))

    def chunk(text: str | None, finish_reason: str | None = None) -> str:
        make = chat_choice or _choice
        return _sse({**meta, "choices": [make(text, finish_reason)]})

    async def events() -> AsyncIterator[str]:
        try:
            if chat_choice is not None:
                yield chunk(None)  # OpenAI's first chat chunk: the role
            elif req.echo:
                yield chunk(job.prompt)
            while (piece := await pieces.get()) is not None:
                yield chunk(piece)
            if future.exception() is not None:  # logged by the worker's caller below
                LOG.error("generation failed", exc_info=future.exception())
                yield _sse({"error": {"message": "generation failed: internal error (the server "
                                      "log has the details)", "type": "server_error",
                                      "param": None, "code": None}})
                return
            yield chunk("", job.finish_reason)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({**meta, "choices": [], "usage": _usage(job)})
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects (the response task is cancelled)
            job.cancel.set()  # a no-op once the job is done; otherwise stops it within a token

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _usage(job: Job) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def _busy(engine: Engine) -> JSONResponse:
    return error_response(
        503, f"the server is busy ({engine.capacity} requests running or queued); retry shortly",
        "server_overloaded", code="queue_full", headers={"Retry-After": "1"})


def _too_large() -> JSONResponse:
    # Connection: close: the rest of the body is never read, so the connection cannot be reused.
    return error_response(413, f"the request body is over {MAX_BODY >> 20} MiB; send a shorter prompt",
                          code="body_too_large", headers={"Connection": "close"})


def _unknown_model(name: str, served: str) -> JSONResponse:
    return error_response(404, f"model {name!r} is not served here; this server serves {served!r}",
                          param="model", code="model_not_found")
