"""An OpenAI-compatible HTTP server over any `Backend`: ``cai serve``.

Serves a model (usually the SL-CAI or RL-CAI model a run just trained) to anything that speaks
the OpenAI API: the ``openai`` client, chat UIs, evaluation harnesses, and cai's own
``openai_http`` backend on other machines. Standard library only (``http.server``), one thread
per connection. This module is the HTTP layer (request parsing, routes, server-sent events,
errors); the model-side work (batching, token-level decoding, log-probs) is in `cai.serve_engine`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

- Plain requests from many clients are gathered into shared batches (`cai.serve_engine.Batcher`): one
  ``backend.generate`` call runs every request that arrived while the model was busy.
- ``stream: true`` (token by token) and log-probs need the model itself, so they work over an
  `HFBackend` only, one request at a time per decode step. Reported log-probs are the model's
  own (log-softmax of its logits, before temperature, top-k or top-p).
- ``/v1/completions`` with ``echo: true`` and ``logprobs`` returns the log-prob of every prompt
  token (one forward pass), which is what choice scoring over HTTP needs.
- A chat whose last message is from the assistant is continued (cai's convention, and what vLLM
  does with ``continue_final_message``); the vLLM fields are accepted and otherwise ignored.
- Defaults follow OpenAI: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 16 for completions;
  chats default to 512 new tokens. Without ``seed`` each request draws a random one.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from cai.backends.base import Backend
from cai.errors import CaiError
from cai.serve_engine import Batcher, Completion, ContextLengthError, HFRunner, Token
from cai.types import SamplingParams

log = logging.getLogger(__name__)

CHAT_DEFAULT_MAX_TOKENS = 512
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_TOP_LOGPROBS = 20
MAX_BODY_BYTES = 64 << 20


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


def _api_error(err: Exception) -> ApiError:
    """How an error raised while answering a request is reported to the client."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextLengthError):
        return ApiError(400, str(err), "context_length_exceeded")
    if isinstance(err, CaiError):  # the request asked for something the backend can't do (too long, empty...)
        return ApiError(400, str(err))
    return ApiError(500, f"{type(err).__name__}: {err}")


# ------------------------------------------------------------------------------ requests

def _sampling(body: dict[str, Any], default_max_tokens: int) -> tuple[SamplingParams, int]:
    """SamplingParams and seed from an OpenAI request body."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported; send several requests instead")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise ApiError(400, f"seed must be an integer, got {seed!r}")
    try:
        params = SamplingParams(
            max_new_tokens=int(max_tokens if max_tokens is not None else default_max_tokens),
            temperature=float(body["temperature"] if body.get("temperature") is not None else 1.0),
            top_p=float(body["top_p"] if body.get("top_p") is not None else 1.0),
            top_k=max(0, int(body.get("top_k") or 0)),  # vLLM spells "off" as -1
            stop=tuple(stop),
        )
    except (TypeError, ValueError) as err:
        raise ApiError(400, f"bad sampling parameter: {err}") from err
    return params, (seed if seed is not None else secrets.randbits(63)) & ((1 << 63) - 1)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    chat = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] has role {role!r}; use system, user or assistant")
        content = m.get("content") or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts")
        chat.append({"role": role, "content": content})
    return chat


def _top_n(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {value!r}")
    return value


def _chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top]} for t in tokens]}


def _legacy_logprobs(tokens: list[Token], base: int = 0) -> dict[str, Any]:
    """The completions endpoint's parallel lists; offsets count from ``base`` in the returned text."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        # Two tokens can decode to the same text (e.g. halves of one character); the likelier one stays.
        "top_logprobs": [None if t.logprob is None else dict(reversed(t.top)) for t in tokens],
        "text_offset": [base + t.offset for t in tokens],
    }


# ------------------------------------------------------------------------------- server

class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server; build it with `serve_app`, then ``start()`` (background) or ``serve_forever()``."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, backend: Backend, model_name: str, host: str, port: int, *, max_batch: int,
                 batch_wait_s: float, api_key: str | None) -> None:
        super().__init__((host, port), _Handler)
        self.backend, self.model_name, self.api_key = backend, model_name, api_key
        self.model_lock = threading.Lock()
        self.batcher = Batcher(backend, self.model_lock, max_batch, batch_wait_s)
        self.hf = HFRunner(backend, self.model_lock) if _is_hf(backend) else None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL clients use, ``http://host:port/v1``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIServer:
        """Serve in a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="cai-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
        self.server_close()
        self.batcher.close()

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_hf(backend: Backend) -> bool:
    from cai.backends.hf import HFBackend

    return isinstance(backend, HFBackend)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: don't let them wait on ACKs
    server: OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)

    # ---------------------------------------------------------------- plumbing

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_events(self) -> Callable[[dict[str, Any] | str], None]:
        """Open a server-sent-events response (chunked); returns a function that sends one event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event: dict[str, Any] | str) -> None:
            data = f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        return send

    def _end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _handle(self, route: Callable[[], None]) -> None:
        try:
            if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
                raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key")
            route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a server answers 500 and keeps serving
            if not isinstance(err, (ApiError, CaiError)):
                log.exception("request failed")
            error = _api_error(err)
            self._send_json(error.status, error.body())

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    def _get(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        card = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "cai"}
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif path == f"/v1/models/{self.server.model_name}":
            self._send_json(200, card)
        else:
            raise ApiError(404, f"no route GET {path}", "not_found")

    def _post(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions}
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
        raw = self.rfile.read(length)  # read before any error, so the connection stays usable
        if path not in routes:
            raise ApiError(404, f"no route POST {path}", "not_found")
        try:
            body = json.loads(raw or b"null")
        except ValueError as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from err
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, self.server.model_name):
            raise ApiError(404, f"the model `{body['model']}` does not exist; this server serves "
                                f"`{self.server.model_name}`", "model_not_found")
        routes[path](body)

    # ---------------------------------------------------------------- generation

    def _generate(self, prompt: str, prompt_ids: list[int] | None, params: SamplingParams, seed: int,
                  top_n: int | None, on_delta: Callable[[str, list[Token]], None] | None,
                  on_prompt: Callable[[list[Token]], None] | None) -> Completion:
        """Token by token on the model when log-probs, echo or streaming ask for it, else through the batcher."""
        hf = self.server.hf
        if hf is not None and (top_n is not None or on_delta is not None or prompt_ids is not None):
            ids = prompt_ids if prompt_ids is not None else self.server.backend.encode([prompt])[0]
            echo_text = prompt if on_prompt is not None else None
            return hf.run(ids, params, seed, top_n or 0, echo_text, on_delta=on_delta, on_prompt=on_prompt)[1]
        if top_n is not None or prompt_ids is not None:
            raise ApiError(400, "this server's backend can't return log-probs or take token ids")
        text = self.server.batcher.submit(prompt, params, seed)
        if on_delta is not None:
            on_delta(text, [])
        # The backend returns text only, so its tokens are counted again (re-encoding can differ a
        # little from what was generated); a full budget is taken to mean the text was cut short.
        used = min(self.server.backend.count_tokens(text), params.max_new_tokens) if text else 0
        return Completion(text, "length" if used >= params.max_new_tokens else "stop", used)

    def _respond(self, body: dict[str, Any], kind: str, prompt: str, prompt_ids: list[int] | None,
                 params: SamplingParams, seed: int, top_n: int | None,
                 shape: Callable[[str, list[Token] | None, str | None], dict[str, Any]],
                 on_prompt: Callable[[list[Token]], None] | None = None) -> None:
        """Run one generation and answer it whole or as a stream; ``shape`` builds one choice."""
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self.server.model_name}
        n_prompt = len(prompt_ids) if prompt_ids is not None else self.server.backend.count_tokens(prompt)
        if not body.get("stream"):
            gen = self._generate(prompt, prompt_ids, params, seed, top_n, None, on_prompt)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": gen.completion_tokens,
                     "total_tokens": n_prompt + gen.completion_tokens}
            choice = shape(gen.text, gen.tokens if top_n is not None else None, gen.finish_reason)
            self._send_json(200, {**head, "object": kind, "choices": [choice], "usage": usage})
            return
        send = self._start_events()
        chunk = {**head, "object": f"{kind}.chunk" if kind == "chat.completion" else kind}
        first = [kind == "chat.completion"]

        def on_delta(text: str, tokens: list[Token]) -> None:
            choice = shape(text, tokens if top_n is not None else None, None)
            if first[0]:
                choice["delta"]["role"] = "assistant"
                first[0] = False
            send({**chunk, "choices": [choice]})

        try:
            gen = self._generate(prompt, prompt_ids, params, seed, top_n, on_delta, on_prompt)
            final = shape("", [] if top_n is not None else None, gen.finish_reason)
            if kind == "chat.completion":
                final["delta"] = {}
            send({**chunk, "choices": [final]})
            if (body.get("stream_options") or {}).get("include_usage"):
                send({**chunk, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens":
                      gen.completion_tokens, "total_tokens": n_prompt + gen.completion_tokens}})
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as err:  # noqa: BLE001 - the headers are gone: report in-band
            if not isinstance(err, (ApiError, CaiError)):
                log.exception("streamed request failed")
            send(_api_error(err).body())
        send("[DONE]")
        self._end_events()

    def _chat(self, body: dict[str, Any]) -> None:
        chat = _messages(body)
        params, seed = _sampling(body, CHAT_DEFAULT_MAX_TOKENS)
        top_n = _top_n(body.get("top_logprobs") or 0, "top_logprobs") if body.get("logprobs") else None
        prompt = self.server.backend.render(chat)
        stream = bool(body.get("stream"))

        def shape(text: str, tokens: list[Token] | None, finish: str | None) -> dict[str, Any]:
            key, value = ("delta", {"content": text}) if stream else ("message", {"role": "assistant", "content": text})
            logprobs = None if tokens is None else _chat_logprobs(tokens)
            return {"index": 0, key: value, "logprobs": logprobs, "finish_reason": finish}

        self._respond(body, "chat.completion", prompt, None, params, seed, top_n, shape)

    def _completions(self, body: dict[str, Any]) -> None:
        prompt, prompt_ids = self._completion_prompt(body.get("prompt"))
        echo = bool(body.get("echo"))
        top_n = None if body.get("logprobs") is None else _top_n(body["logprobs"], "logprobs")
        if body.get("max_tokens") == 0 or body.get("max_completion_tokens") == 0:
            if not echo:
                raise ApiError(400, "max_tokens=0 only makes sense with echo=true")
            if body.get("stream"):
                raise ApiError(400, "max_tokens=0 can't be streamed")
            self._echo_only(prompt, prompt_ids, top_n)
            return
        params, seed = _sampling(body, COMPLETION_DEFAULT_MAX_TOKENS)
        echoed: list[Token] = []  # the prompt's scored tokens, filled before decoding starts
        on_prompt = echoed.extend if echo and top_n is not None else None
        lead = [prompt if echo else ""]

        def shape(text: str, tokens: list[Token] | None, finish: str | None) -> dict[str, Any]:
            logprobs = None
            if tokens is not None:
                base = len(prompt) if echo else 0
                logprobs = _legacy_logprobs(tokens, base)
                if echoed:
                    before = _legacy_logprobs(echoed)
                    logprobs = {k: before[k] + logprobs[k] for k in logprobs}
                    echoed.clear()  # a stream echoes the prompt in its first chunk only
            text, lead[0] = lead[0] + text, ""
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        self._respond(body, "text_completion", prompt, prompt_ids, params, seed, top_n, shape, on_prompt)

    def _completion_prompt(self, value: Any) -> tuple[str, list[int] | None]:
        """(text, token ids or None) of a completions ``prompt``: a string or a list of token ids."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        if isinstance(value, str) and value:
            return value, None
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            if self.server.hf is None:
                raise ApiError(400, "this server's backend takes text prompts only")
            vocab = len(self.server.hf.tokenizer)
            if not all(0 <= t < vocab for t in value):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})")
            return self.server.hf.decode(value, False), value
        raise ApiError(400, "prompt must be a non-empty string or list of token ids (one prompt per request)")

    def _echo_only(self, prompt: str, prompt_ids: list[int] | None, top_n: int | None) -> None:
        logprobs = None
        if top_n is not None:
            if self.server.hf is None:
                raise ApiError(400, "this server's backend can't return log-probs")
            ids = prompt_ids if prompt_ids is not None else self.server.backend.encode([prompt])[0]
            logprobs = _legacy_logprobs(self.server.hf.run(ids, None, 0, top_n, echo_text=prompt)[0])
        n_prompt = len(prompt_ids) if prompt_ids is not None else self.server.backend.count_tokens(prompt)
        choice = {"index": 0, "text": prompt, "finish_reason": "length", "logprobs": logprobs}
        self._send_json(200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                              "model": self.server.model_name, "choices": [choice],
                              "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}})


# ------------------------------------------------------------------------------ entry points

def serve_app(
    backend: Backend,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    batch_wait_s: float = 0.005,
    api_key: str | None = None,
) -> OpenAIServer:
    """Build (but don't start) an OpenAI-compatible server over ``backend``.

    Args:
        backend: any `Backend`; streaming token by token and log-probs need an `HFBackend`.
        model_name: the name clients put in ``model`` (and see in ``/v1/models``).
        host: interface to bind; the default is this machine only. ``0.0.0.0`` exposes it to the network.
        port: TCP port; 0 picks a free one (read it back from ``server.url``).
        max_batch: most concurrent requests gathered into one ``generate`` call.
        batch_wait_s: how long the first request of a batch waits for others to join.
        api_key: when set, requests must send ``Authorization: Bearer <api_key>``.

    Returns:
        The server: ``server.start()`` serves in a background thread, ``server.serve_forever()`` in
        this one; ``server.stop()`` (or ``with server:``) shuts it down.

    Raises:
        OSError: the port is taken.
    """
    return OpenAIServer(backend, model_name, host, port, max_batch=max_batch, batch_wait_s=batch_wait_s,
                        api_key=api_key)


def run_server(
    model_spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    **backend_kwargs: Any,
) -> None:
    """Load ``model_spec`` into an `HFBackend` and serve it until Ctrl-C (the ``cai serve`` command).

    Args:
        model_spec: ``bundled``, a model folder, a ``.gguf`` file or a hub id (see `cai.models`).
        host, port: where to listen.
        model_name: the name clients use; defaults to ``model_spec``.
        api_key: require this bearer key from clients (None: no key).
        **backend_kwargs: passed to `HFBackend.from_spec` (``dtype``, ``device``, ``batch_size``, ...).

    Raises:
        CaiError: the model can't be loaded, or the port is taken.
    """
    from cai.backends.hf import HFBackend

    backend = HFBackend.from_spec(model_spec, **backend_kwargs)
    try:
        server = serve_app(backend, model_name or model_spec, host=host, port=port, api_key=api_key)
    except OSError as err:
        raise CaiError(f"can't listen on {host}:{port}: {err.strerror or err}") from err
    print(f"serving {model_name or model_spec} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
