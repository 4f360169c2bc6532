"""Running ``cai serve``'s app under uvicorn: in the foreground (the CLI) or in a background thread (tests).

The listening socket is bound here, before anything else, so that a bad port or one already in
use is one sentence at once, not a traceback after the model has loaded for half a minute; a
background server is started only once uvicorn says it is accepting connections.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any

from cai.backends.base import Backend
from cai.backends.hf import HFBackend
from cai.errors import CaiError
from cai.serve.app import MAX_BODY_BYTES, build_app
from cai.serve.engine import Engine

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: a free one).

    Raises:
        CaiError: the port is out of range, the address can't be used, or the port is taken.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise CaiError(f"port must be from 0 to 65535 (0 picks a free one), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says TCP. Without it each response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart needn't wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        reason = "the port is already in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
        raise CaiError(f"can't listen on {host}:{port}: {reason}") from err
    return sock


class Server:
    """uvicorn serving one engine's app on a bound socket. Build it with `serve_app`.

    ``start()`` serves in a background thread and returns once requests are accepted; ``serve_forever()``
    serves in this thread until Ctrl-C; ``stop()`` (or leaving ``with server:``) shuts it down and
    stops the engine's batching thread.
    """

    def __init__(self, engine: Engine, app: Any, sock: socket.socket, *, access_log: bool = False) -> None:
        import uvicorn

        self.engine, self.sock = engine, sock
        # log_config=None: uvicorn's loggers propagate to whatever the process configured (pytest's
        # capture, the CLI's basicConfig) instead of installing handlers of their own.
        config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="off", ws="none",
                                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
        """The base URL clients use, ``http://host:port/v1``."""

    def start(self, timeout_s: float = 30.0) -> Server:
        """Serve in a background thread; return once the server accepts requests.

        Raises:
            RuntimeError: uvicorn stopped, or did not start within ``timeout_s``.
        """
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="cai-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C or SIGTERM (uvicorn handles both, finishing open requests)."""
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving (open requests get a few seconds to finish), release the port, stop the engine."""
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def _close(self) -> None:
        self.sock.close()
        self.engine.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_app(
    backend: Backend,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    batch_wait_s: float = 0.005,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    access_log: bool = False,
    sock: socket.socket | None = None,
) -> Server:
    """Build (but don't start) an OpenAI-compatible server over ``backend``, its socket already bound.

    Args:
        backend: any `Backend`; streaming token by token, log-probs and token-id prompts need an `HFBackend`.
        model_name: the name clients put in ``model`` (and see in ``/v1/models``).
        host: interface to bind; the default is this machine only. ``0.0.0.0`` exposes it to the network.
        port: TCP port; 0 picks a free one (read it back from ``server.url``).
        max_batch: most concurrent requests gathered into one ``generate`` call.
        batch_wait_s: how long the first request of a batch waits for others to join.
        api_key: when set, ``/v1`` requests must send ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get 413.
        access_log: log one line per request (method, path, status; never headers).
        sock: an already bound socket to serve on (then ``host`` and ``port`` are not used).

    Returns:
        The `Server`: ``server.start()`` serves in a background thread, ``server.serve_forever()`` in
        this one; ``server.stop()`` (or ``with server:``) shuts it down.

    Raises:
        CaiError: the port is out of range or taken.
    """
    sock = sock or bind_socket(host, port)
    engine = Engine(backend, max_batch, batch_wait_s)
    app = build_app(engine, model_name, api_key=api_key, max_body_bytes=max_body_bytes)
    return Server(engine, app, sock, access_log=access_log)


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

    The port is bound before the model loads, so a bad or busy port fails at once.

    Args:
        model_spec: ``bundled``, a model folder, a ``.gguf`` file or a hub id (see `cai.models`).
        host, port: where to listen.
        model_name: the name clients use; defaults to ``model_spec``.
        api_key: require this bearer key from clients (None: no key).
        **backend_kwargs: passed to `HFBackend.from_spec` (``dtype``, ``device``, ``batch_size``, ...).

    Raises:
        CaiError: the port is out of range or taken, or the model can't be loaded.
    """
    sock = bind_socket(host, port)
    try:
        backend = HFBackend.from_spec(model_spec, **backend_kwargs)
    except BaseException:
        sock.close()
        raise
    server = serve_app(backend, model_name or model_spec, api_key=api_key, access_log=True, sock=sock)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"serving {model_name or model_spec} at {server.url} (Ctrl-C stops)", flush=True)
    if backend_kwargs.get("compile_decode"):
        print("compiled decoding: " + ("on; each 256/512/1024... token window compiles on its first lone request "
                                       "(tens of seconds on a small CPU)" if backend.static_decoder is not None
                                       else "this model's decoding step can't be compiled as one graph; off"), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
