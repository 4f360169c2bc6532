"""JSON over HTTP to one or more servers, the part of the HTTP backend that knows nothing of OpenAI.

One request per job, several in flight at once (a thread pool of ``concurrency`` workers sharing
one ``httpx`` connection pool), spread round-robin over one or more servers. Rate limits (429),
server errors (5xx), dropped connections and timeouts are retried with exponential backoff and
jitter (or the server's ``Retry-After``); any other 4xx means the request itself is wrong, so it
fails at once with the server's message. `cai.backends.openai_http` builds the request bodies.

With a ``cache_dir``, every answered request is kept on disk under a key made of the endpoint
path and the JSON body only (never the API key or the server's URL, so servers taken round-robin
share it): a request answered before, by this run or an earlier one, is not sent again. ``usage``
counts what was sent and what the servers said it cost.
"""

from __future__ import annotations

import email.utils
import hashlib
import itertools
import json
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from cai.errors import CaiError
from cai.io import write_json_atomic

RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))
MAX_RETRY_AFTER_S = 120.0
"""A ``Retry-After`` longer than this is cut to it, so a misconfigured server can't stall a run for hours."""


USAGE_KEYS = ("requests", "cache_hits", "prompt_tokens", "completion_tokens")
"""The counters of `HTTPTransport.usage`."""


def cache_key(path: str, body: dict[str, Any]) -> str:
    """The cache key of a request: sha256 of the endpoint path and the body as sorted-key JSON.

    Neither the API key nor the server's URL is part of it, so servers taken round-robin (and a
    key that changes) share one cache.
    """
    text = path + "\n" + json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HTTPRequestError(CaiError):
    """The server rejected a request (a 4xx other than 429): retrying would not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def backoff_delay(
    attempt: int, retry_after: float | None, base_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry number ``attempt + 1``.

    The server's ``Retry-After`` wins when given (capped at `MAX_RETRY_AFTER_S`); otherwise
    ``base_s * 2**attempt``, capped at ``max_s``, scaled by a random factor in [0.5, 1) so that many
    clients that failed together don't retry together.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
    return min(max_s, base_s * 2**attempt) * (0.5 + 0.5 * rng())


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from now; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _normalize_url(url: str) -> str:
    """Strip a trailing slash; a bare ``http://host:port`` gets the usual ``/v1`` prefix."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise CaiError(f"base URL {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    return url if parts.path else url + "/v1"


def _error_message(response: Any) -> str:
    """The server's own error message (OpenAI-style JSON, or the start of the body)."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(data.get("detail"), str):
            return data["detail"]
    return str(data)[:300]


class HTTPTransport:
    """POSTs JSON round-robin over servers, retrying what a retry can fix, ``concurrency`` requests at a time.

    Args:
        base_urls: server roots including the API prefix, e.g. ``http://10.0.0.5:8000/v1``; a URL
            with no path gets ``/v1``. Requests go round-robin over them (retries move on to the next).
        api_key_env: environment variable holding the API key, read at every request and sent as
            ``Authorization: Bearer ...``; unset or empty means no header. The key itself is never stored.
        concurrency: most requests in flight at once.
        timeout_s: seconds one request may take (connect, read, write each).
        max_retries: retries after the first attempt, for 429, 5xx, connection errors and timeouts.
        backoff_s: delay before the first retry; it doubles after each (with jitter).
        max_backoff_s: longest delay between two retries (unless the server's ``Retry-After`` asks for more).
        cache_dir: a folder keeping every successful answer (None: no cache). An answer lives in
            ``<cache_dir>/http_cache/<first 2 hex digits>/<key>.json``, the server's JSON as it
            came, written atomically; ``key`` is the sha256 of the path and the body (`cache_key`).

    Raises:
        CaiError: ``httpx`` is missing, or an argument is out of range.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        api_key_env: str,
        concurrency: int,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        cache_dir: str | Path | None = None,
    ) -> None:
        try:
            import httpx  # an optional dependency (the http extra)
        except ImportError as err:
            raise CaiError("the HTTP backend needs httpx: pip install 'cai[http]'") from err
        if not base_urls:
            raise CaiError("the HTTP backend needs at least one base URL")
        if concurrency < 1:
            raise CaiError(f"concurrency must be at least 1, got {concurrency}")
        if timeout_s <= 0:
            raise CaiError(f"timeout_s must be positive, got {timeout_s}")
        if max_retries < 0:
            raise CaiError(f"max_retries must be 0 or more, got {max_retries}")
        self.base_urls = [_normalize_url(u) for u in base_urls]
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._httpx = httpx
        self._client = httpx.Client(
            timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        )
        self._turn = itertools.count()
        self._turn_lock = threading.Lock()
        self.sleep: Callable[[float], None] = time.sleep
        """How the retries wait; tests replace it to record the delays."""
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / "http_cache"
        self._usage = dict.fromkeys(USAGE_KEYS, 0)
        self._usage_lock = threading.Lock()

    def usage(self) -> dict[str, int]:
        """What was sent so far, a copy fit for a manifest.

        Keys: ``requests`` (POSTs sent, retries included), ``cache_hits`` (requests answered from
        ``cache_dir`` instead), ``prompt_tokens`` and ``completion_tokens`` (summed from the answers'
        ``usage``, 0 where a server gives none; answers from the cache add nothing).
        """
        with self._usage_lock:
            return dict(self._usage)

    def _count(self, **amounts: int) -> None:
        with self._usage_lock:
            for name, amount in amounts.items():
                self._usage[name] += amount

    def _cached(self, path: str, body: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None]:
        """Where this request's answer is kept, and the answer when it was kept before."""
        if self.cache_dir is None:
            return None, None
        key = cache_key(path, body)
        file = self.cache_dir / key[:2] / f"{key}.json"
        try:
            answer = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not there yet; an unreadable file is asked again and rewritten
            return file, None
        return file, answer if isinstance(answer, dict) else None

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _next_url(self) -> str:
        with self._turn_lock:
            return self.base_urls[next(self._turn) % len(self.base_urls)]

    def post(self, path: str, body: dict[str, Any], keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the next server, retrying what a retry can fix; the cached answer if kept.

        Args:
            keep: whether an answer is worth keeping (None: every one). An answer it rejects (a
                server that lost its log-probs, say) is returned but not cached, and a cached one it
                rejects is asked again, so a rerun after the server is fixed gets a real answer.

        Raises:
            HTTPRequestError: a 4xx other than 429 (no retry).
            CaiError: every attempt failed; names the last URL and error.
        """
        file, answer = self._cached(path, body)
        if answer is not None and (keep is None or keep(answer)):
            self._count(cache_hits=1)
            return answer
        last_error, url = "", ""
        for attempt in range(self.max_retries + 1):
            url = self._next_url() + path
            retry_after = None
            self._count(requests=1)
            try:
                response = self._client.post(url, json=body, headers=self._headers())
            except self._httpx.TransportError as err:  # refused, reset, DNS, timeouts
                last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if response.status_code < 300:
                    try:
                        answer = response.json()
                    except ValueError as err:
                        raise CaiError(f"{url} answered 200 with a body that is not JSON: {response.text[:200]!r}") from err
                    self._record(answer, file if keep is None or keep(answer) else None)
                    return answer
                message = _error_message(response)
                if response.status_code in (401, 403):
                    message += f"; check the API key in the environment variable {self.api_key_env} (model.api_key_env)"
                if response.status_code not in RETRY_STATUSES:
                    raise HTTPRequestError(
                        f"{url} rejected the request with HTTP {response.status_code}: {message}", response.status_code
                    )
                last_error = f"HTTP {response.status_code}: {message}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if attempt < self.max_retries:
                self.sleep(backoff_delay(attempt, retry_after, self.backoff_s, self.max_backoff_s))
        raise CaiError(f"request to {url} failed after {self.max_retries + 1} attempts; the last error was {last_error}")

    def _record(self, answer: Any, file: Path | None) -> None:
        """Count an answer's tokens and keep it in ``file`` (None: don't)."""
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if isinstance(usage, dict):
            counts = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
            self._count(**{k: v for k, v in counts.items() if type(v) is int})
        if file is not None and isinstance(answer, dict):
            write_json_atomic(file, answer)

    def run_all(self, jobs: Sequence[Callable[[], Any]], on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run the jobs ``concurrency`` at a time; results in input order. The first failure cancels the rest."""
        if len(jobs) == 1:
            result = jobs[0]()
            if on_done is not None:
                on_done(0, result)
            return [result]
        results: list[Any] = [None] * len(jobs)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)), thread_name_prefix="cai-http")
        try:
            pending = {pool.submit(job): i for i, job in enumerate(jobs)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    i = pending.pop(future)
                    results[i] = future.result()  # raises the job's error
                    if on_done is not None:
                        on_done(i, results[i])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results
