"""The ASGI routes of ``cai serve``: OpenAI's chat and completions API over an `Engine`.

Routes: ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{name}``), ``POST /v1/chat/completions``,
``POST /v1/completions``. Bodies are validated by the models in `cai.serve.schemas`; every error is
answered the way OpenAI answers it, ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
for a bad request (never FastAPI's default 422 shape) and a 500 for a bug.

The engine blocks (it runs the model), so no engine call runs on the event loop: whole answers
run in starlette's worker threads (``run_in_threadpool``), and a stream is decoded in a thread of
its own that hands chunks to the loop through an ``asyncio.Queue``. When a streaming client goes
away, starlette cancels the response and the decoding thread stops before its next token.

- ``stream: true`` sends server-sent events, ending with ``data: [DONE]``.
- Log-probs (chat ``logprobs``/``top_logprobs``, legacy ``logprobs``) are the model's own
  (log-softmax of its logits, before temperature, top-k or top-p).
- ``/v1/completions`` with ``echo: true`` and ``logprobs`` returns the log-prob of every prompt
  token (one forward pass), which is what choice scoring over HTTP needs.
- With an API key, every ``/v1`` route needs ``Authorization: Bearer <key>`` (compared in constant
  time, never logged); ``/health`` stays open for load balancers, as in vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cai.errors import CaiError
from cai.serve.engine import Completion, ContextLengthError, Engine, Token
from cai.serve.schemas import (
    CHAT_DEFAULT_MAX_TOKENS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    validation_message,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
"""Largest request body accepted (413 above it): far more than any context holds, far less than memory."""
LOGPROB_FLOOR = -9999.0
"""Log-probs are clamped here, as vLLM does: JSON has no ``-Infinity``."""


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _api_error(err: Exception) -> ApiError:
    """How an error raised while answering a request is reported to the client."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextLengthError):
        return ApiError(400, str(err), "context_length_exceeded")
    if isinstance(err, CaiError):  # the request asked for something the backend can't do (too long, empty...)
        return ApiError(400, str(err))
    return ApiError(500, f"{type(err).__name__}: {err}")


# ------------------------------------------------------------------------------ the app

def build_app(engine: Engine, model_name: str, *, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> ASGIApp:
    """The ASGI app serving ``engine`` under the name ``model_name``.

    Args:
        engine: the model side (its lifetime is the caller's: close it after the server stops).
        model_name: the name clients put in ``model`` (and see in ``/v1/models``).
        api_key: when set, ``/v1`` requests must send ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies are refused with 413 before they are read.
    """
    app = FastAPI(title="cai serve", summary="OpenAI-compatible API over a cai model", docs_url=None, redoc_url=None)
    routes = _Routes(engine, model_name)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(err.errors())
        return ApiError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", "not_found").response()
        if err.status_code == 405:
            return ApiError(405, f"{request.url.path} does not take {request.method}", "method_not_allowed").response()
        return ApiError(err.status_code, str(err.detail)).response()

    @app.exception_handler(CaiError)
    async def _refused(request: Request, err: CaiError) -> JSONResponse:
        return _api_error(err).response()

    @app.exception_handler(ApiError)
    async def _api(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:  # starlette re-raises it: uvicorn logs it
        return _api_error(err).response()

    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{name:path}")(routes.model)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/completions")(routes.completions)
    return _Guard(app, api_key, max_body_bytes)


class _Routes:
    """The endpoints; each answers one request over the shared engine."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.card = {"id": model_name, "object": "model", "created": 0, "owned_by": "cai"}

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card]}

    async def model(self, name: str) -> dict[str, Any]:
        self._check_model(name)
        return self.card

    def _check_model(self, name: str | None) -> None:
        if name not in (None, self.model_name):
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model_not_found", "model")

    async def chat(self, body: ChatRequest) -> Response:
        self._check_model(body.model)
        params, seed = body.sampling(CHAT_DEFAULT_MAX_TOKENS)
        prompt = await run_in_threadpool(self.engine.backend.render, body.chat())
        stream, top_n = bool(body.stream), body.top_n

        def shape(text: str, tokens: list[Token] | None, finish: str | None) -> dict[str, Any]:
            key, value = ("delta", {"content": text}) if stream else ("message", {"role": "assistant", "content": text})
            logprobs = None if tokens is None or top_n is None else _chat_logprobs(tokens)
            return {"index": 0, key: value, "logprobs": logprobs, "finish_reason": finish}

        def run(**hooks: Any) -> Completion:
            return self.engine.generate(prompt, None, params, seed, top_n, **hooks)

        return await self._answer("chat.completion", body.stream, body.include_usage, run, shape)

    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        prompt_ids = body.prompt if isinstance(body.prompt, list) else None
        prompt = body.prompt if prompt_ids is None else await run_in_threadpool(self.engine.token_prompt, prompt_ids)
        echo, top_n = bool(body.echo), body.logprobs
        if body.new_tokens == 0:
            if not echo:
                raise ApiError(400, "max_tokens=0 only makes sense with echo=true", param="max_tokens")
            if body.stream:
                raise ApiError(400, "max_tokens=0 can't be streamed", param="stream")
            scored = await run_in_threadpool(self.engine.score_prompt, prompt, prompt_ids, top_n)
            logprobs = None if scored.tokens is None else _legacy_logprobs(scored.tokens)
            choice = {"index": 0, "text": prompt, "finish_reason": "length", "logprobs": logprobs}
            return JSONResponse({**self._head("text_completion"), "object": "text_completion", "choices": [choice],
                                 "usage": _usage(scored)})
        params, seed = body.sampling(COMPLETION_DEFAULT_MAX_TOKENS)
        echoed: list[Token] = []  # the prompt's scored tokens, filled before decoding starts
        lead = [prompt if echo else ""]

        def shape(text: str, tokens: list[Token] | None, finish: str | None) -> dict[str, Any]:
            logprobs = None
            if tokens is not None and top_n is not None:
                logprobs = _legacy_logprobs(tokens, len(prompt) if echo else 0)
                if echoed:
                    before = _legacy_logprobs(echoed)
                    logprobs = {k: before[k] + logprobs[k] for k in logprobs}
                    echoed.clear()  # a stream echoes the prompt in its first chunk only
            text, lead[0] = lead[0] + text, ""
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        def run(**hooks: Any) -> Completion:
            on_prompt = echoed.extend if echo and top_n is not None else None
            return self.engine.generate(prompt, prompt_ids, params, seed, top_n, on_prompt=on_prompt, **hooks)

        return await self._answer("text_completion", body.stream, body.include_usage, run, shape)

    # ---------------------------------------------------------------- answering

    def _head(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

    async def _answer(self, kind: str, stream: bool | None, include_usage: bool, run: Callable[..., Completion],
                      shape: Callable[[str, list[Token] | None, str | None], dict[str, Any]]) -> Response:
        """Run one generation and answer it whole or as a stream; ``shape`` builds one choice (it leaves
        log-probs out unless the request asked for them)."""
        head = self._head(kind)
        if not stream:
            gen = await run_in_threadpool(run)
            choice = shape(gen.text, gen.tokens, gen.finish_reason)
            return JSONResponse({**head, "object": kind, "choices": [choice], "usage": _usage(gen)})
        chunk = {**head, "object": f"{kind}.chunk" if kind == "chat.completion" else kind}
        events = _decode_in_thread(run)
        first = await events.__anext__()
        if isinstance(first, Exception):  # nothing sent yet: answer with a real status
            await events.aclose()
            raise first
        return StreamingResponse(self._events(kind, chunk, first, events, shape, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, kind: str, chunk: dict[str, Any], first: Any, events: AsyncIterator[Any],
                      shape: Callable[..., dict[str, Any]], include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of one stream, from the decoding thread's deltas and its final `Completion`."""
        greet = kind == "chat.completion"
        item = first
        while True:
            if isinstance(item, tuple):  # (text, tokens): one delta
                choice = shape(item[0], item[1], None)
                if greet:
                    choice["delta"]["role"] = "assistant"
                    greet = False
                yield _event({**chunk, "choices": [choice]})
            elif isinstance(item, Completion):
                final = shape("", [] if item.tokens is not None else None, item.finish_reason)
                if kind == "chat.completion":
                    final["delta"] = {}
                yield _event({**chunk, "choices": [final]})
                if include_usage:
                    yield _event({**chunk, "choices": [], "usage": _usage(item)})
                break
            else:  # the headers are gone: report in-band
                yield _event(_api_error(item).body())
                break
            item = await events.__anext__()
        yield "data: [DONE]\n\n"


async def _decode_in_thread(run: Callable[..., Completion]) -> AsyncIterator[Any]:
    """Run ``run(on_delta=..., cancel=...)`` in a thread of its own and yield what it produces, as it comes:
    ``(text, tokens)`` deltas, then the `Completion` or the exception that ended it.

    A thread per stream, not starlette's worker pool, because a stream holds its thread for as long as
    it decodes. Closing this generator (the client went away) sets ``cancel``, and the decoding stops
    before its next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped
            cancel.set()

    def work() -> None:
        try:
            put(run(on_delta=lambda text, tokens: put((text, tokens)), cancel=cancel))
        except Exception as err:  # noqa: BLE001 - handed to the stream, which reports it
            if not isinstance(err, (ApiError, CaiError)):
                log.error("streamed request failed", exc_info=err)
            put(err)

    threading.Thread(target=work, name="cai-serve-stream", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            yield item
            if not isinstance(item, tuple):
                return
    finally:
        cancel.set()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(gen: Completion) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _lp(value: float) -> float:
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN too


def _chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode())}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top]} for t in tokens]}


def _legacy_logprobs(tokens: list[Token], base: int = 0) -> dict[str, Any]:
    """The completions endpoint's parallel lists; offsets count from ``base`` in the returned text."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [None if t.logprob is None else _lp(t.logprob) for t in tokens],
        # Two tokens can decode to the same text (e.g. halves of one character); the likelier one stays.
        "top_logprobs": [None if t.logprob is None else {s: _lp(v) for s, v in reversed(t.top)} for t in tokens],
        "text_offset": [base + t.offset for t in tokens],
    }


# ------------------------------------------------------------------------------ the guard

class _Guard:
    """ASGI middleware run before any route: the API key, the body-size limit, the body's type.

    The key and the size are answered before the body is read: a refused request costs no parsing.
    A body without a ``Content-Length`` (chunked) is read here up to the limit and handed on whole.
    The API speaks JSON only, so a body is read as JSON whatever its ``Content-Type`` says (``curl -d``
    sends form encoding, and FastAPI would refuse it).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = None if not api_key else b"Bearer " + api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["method"] == "POST":
            raw = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*raw, (b"content-type", b"application/json")]}
        if self.expected is not None and scope["path"].startswith("/v1") and \
                not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
            log.info("refused %s %s: missing or wrong API key", scope["method"], scope["path"])
            await _send(send, ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                       "invalid_api_key"))
            return
        too_big = ApiError(413, f"the request body is over the server's limit of {self.max_body_bytes} bytes",
                           "request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            if int(length) > self.max_body_bytes:
                await _send(send, too_big)
                return
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    await _send(send, too_big)
                    return
                if not message.get("more_body"):
                    break
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` in one message, then defers to the real one (for disconnects)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


async def _send(send: Send, error: ApiError) -> None:
    data = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
