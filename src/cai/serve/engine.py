"""The model side of ``cai serve``: request batching and token-level decoding.

`cai.serve.app` speaks HTTP; this module does the work it hands over. `Engine` is what the routes
call; it picks one of two ways to run a request:

- `Batcher` gathers plain generation requests from many connections into shared
  ``backend.generate`` calls (any `Backend`).
- `HFRunner` decodes one request token by token and scores prompt tokens through
  `HFBackend.stream`, for streaming, log-probs and ``echo``. The log-probs it reports are the
  model's own (log-softmax of its logits, before temperature, top-k or top-p).

All model work runs on one thread, the batcher's: `HFRunner` hands each piece of its work (the
prompt's pass, each token's step) to it through `Batcher.call`, so only one forward pass runs at a
time, and PyTorch's CPU thread team is the one thread's. (A second thread running the model while the
first one's team lived ran at ~60% speed on the reference machine: a streamed answer came at 11
tokens/s through the server against 23 through the batcher.) Everything here blocks, so the ASGI
layer calls it from worker threads, never on its event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from cai.backends.base import Backend, cut_at_stop
from cai.backends.hf import HFBackend, TokenStream
from cai.errors import CaiError
from cai.types import SamplingParams


class ContextLengthError(CaiError):
    """A prompt plus ``max_tokens`` is longer than the model's context (the server answers 400)."""


@dataclass
class BatchStats:
    """What the `Batcher` has run so far: how well concurrent requests were gathered."""

    calls: int = 0
    """``backend.generate`` calls made."""
    requests: int = 0
    """Requests answered by those calls."""
    largest: int = 0
    """Most requests one call answered."""

    @property
    def mean_batch_size(self) -> float:
        """Requests per ``generate`` call (1.0 means no two requests ever shared a call)."""
        return self.requests / self.calls if self.calls else 0.0


# ------------------------------------------------------------------------------ batching

@dataclass
class _Job:
    prompt: str
    params: SamplingParams
    seed: int
    future: Future


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


class Batcher:
    """Runs plain generation requests in shared ``backend.generate`` calls, one call at a time, and any
    other model work handed to it (`call`), on its one thread.

    The first waiting request opens a batch; whatever else arrives within ``wait_s`` (or queued
    up while the model was busy) joins it, up to ``max_batch``. Requests with different sampling
    settings run as separate calls; each row keeps its own seed, so batching never changes a result.
    """

    def __init__(self, backend: Backend, max_batch: int, wait_s: float) -> None:
        self.backend, self.max_batch, self.wait_s = backend, max_batch, wait_s
        self.queue: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self.stats = BatchStats()  # written by the batching thread only
        self.thread = threading.Thread(target=self._loop, name="cai-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: str, params: SamplingParams, seed: int) -> str:
        """Queue one request and wait for its text (raises what ``backend.generate`` raised for it)."""
        job = _Job(prompt, params, seed, Future())
        self.queue.put(job)
        return job.future.result()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the batching thread (between ``generate`` calls) and return what it returns, or
        raise what it raised. A short piece of work: one forward pass, one token's step."""
        if threading.current_thread() is self.thread:
            return fn()
        job = _Call(fn, Future())
        self.queue.put(job)
        return job.future.result()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if isinstance(job, _Call):
                self._call(job)
                continue
            jobs, deadline, closing = [job], time.monotonic() + self.wait_s, False
            while len(jobs) < self.max_batch:
                try:
                    more = self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                if isinstance(more, _Call):  # a stream's step: short, so it need not wait for the batch
                    self._call(more)
                    continue
                jobs.append(more)
            groups: dict[SamplingParams, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(replace(j.params, seed=0), []).append(j)
            for params, group in groups.items():
                self._run(params, group)
            if closing:
                return

    @staticmethod
    def _call(job: _Call) -> None:
        try:
            job.future.set_result(job.fn())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            job.future.set_exception(err)

    def _run(self, params: SamplingParams, group: list[_Job]) -> None:
        try:
            texts = self.backend.generate([j.prompt for j in group], params, seeds=[j.seed for j in group])
        except Exception as err:  # noqa: BLE001 - handed to the waiting request threads
            if len(group) > 1:  # one bad prompt must not fail its neighbours: run them alone
                for j in group:
                    self._run(params, [j])
                return
            group[0].future.set_exception(err)
            return
        self.stats.calls += 1
        self.stats.requests += len(group)
        self.stats.largest = max(self.stats.largest, len(group))
        for j, text in zip(group, texts):
            j.future.set_result(text)


# ------------------------------------------------------------- token-level work (HFBackend)

@dataclass
class Token:
    id: int
    text: str
    logprob: float | None
    top: list[tuple[str, float]]
    offset: int = 0  # where the token's text starts in the completion (or echoed prompt)


@dataclass
class Completion:
    """What the server answers one request with, in the OpenAI API's terms.

    Not `cai.backends.hf.Generation`, which holds exact prompt and sampled token ids for RL: this
    holds text, why it ended and, when log-probs were asked for, the tokens with their scores.
    """

    text: str
    finish_reason: str
    """``"stop"`` (EOS or a stop string), ``"length"`` (hit ``max_tokens``) or ``"cancelled"`` (client left)."""
    completion_tokens: int
    """Tokens generated (the API's ``usage.completion_tokens``)."""
    tokens: list[Token] | None = None
    """The tokens with their log-probs when `HFRunner` decoded them; None from the `Batcher` path."""
    prompt_tokens: int = 0
    """Tokens in the prompt (the API's ``usage.prompt_tokens``)."""


def check_context(prompt_tokens: int, max_new_tokens: int, limit: int | None) -> None:
    """Raise `ContextLengthError` when a prompt plus its ``max_tokens`` won't fit in ``limit`` tokens."""
    if limit and prompt_tokens + max_new_tokens > limit:
        raise ContextLengthError(f"the prompt has {prompt_tokens} tokens, which with max_tokens={max_new_tokens} "
                                 f"exceeds the model's context of {limit} tokens")


_END = object()
"""What `HFRunner._decode` gets once a stream's steps are exhausted."""


class HFRunner:
    """Single-row decoding and prompt scoring on an `HFBackend`, through its `HFBackend.stream`.

    The stream samples like the backend's rows, so a seeded request gives the same tokens here as
    through ``HFBackend.generate``. Its model work (the prompt's pass and scores, each token's step)
    runs through ``call``: `Batcher.call` in a server, so on the one thread that runs the model.
    """

    def __init__(self, backend: HFBackend, call: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.backend, self.call = backend, call or (lambda fn: fn())
        self.tokenizer = backend.tokenizer
        self.decode_steps = 0
        """Tokens decoded so far, all requests together (a stream whose client left stops adding to it)."""

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def token_pieces(self, ids: list[int]) -> list[str]:
        """Each token's text, decoded with a few tokens of left context so leading spaces survive."""
        pieces = []
        for i in range(len(ids)):
            start = max(0, i - 4)
            before, upto = self.decode(ids[start:i], False), self.decode(ids[start:i + 1], False)
            pieces.append(upto[len(before):] if upto.startswith(before) else self.decode(ids[i:i + 1], False))
        return pieces

    def _top(self, logprobs: Any, n: int) -> list[tuple[str, float]]:
        if not n:
            return []
        values, indices = logprobs.topk(n)
        return [(self.decode([int(i)], False), float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def run(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None,
        seed: int,
        top_n: int,
        echo_text: str | None = None,
        on_delta: Callable[[str, list[Token]], None] | None = None,
        on_prompt: Callable[[list[Token]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[list[Token] | None, Completion | None]:
        """Score the prompt's tokens (when ``echo_text`` is given) and generate (when ``params`` is).

        One forward pass over the prompt serves both. ``on_prompt(tokens)`` receives the scored
        prompt before decoding starts; ``on_delta(text, tokens)`` receives the completion as it
        grows, holding back text that could still turn out to start a stop string. Once ``cancel``
        is set (the client went away) decoding stops before the next token, with finish reason
        ``"cancelled"``.

        Raises:
            ContextLengthError: the prompt plus ``params.max_new_tokens`` exceeds the model's context.
        """
        check_context(len(prompt_ids), params.max_new_tokens if params else 0, self.backend.context_length)

        def start() -> tuple[TokenStream, list[Token] | None]:
            stream = self.backend.stream(prompt_ids, score_prompt=echo_text is not None)
            return stream, (None if echo_text is None
                            else self._score_prompt(prompt_ids, stream.prompt_logits, top_n, echo_text))

        stream, prompt_tokens = self.call(start)
        if on_prompt is not None and prompt_tokens is not None:
            on_prompt(prompt_tokens)
        if params is None:
            return prompt_tokens, None
        return prompt_tokens, self._decode(stream, params, seed, top_n, on_delta, cancel)

    def _score_prompt(self, ids: list[int], logits: Any, top_n: int, text: str) -> list[Token]:
        pieces = self.token_pieces(ids)
        # A BOS the tokenizer added is not part of the text: offsets are counted from the text's end.
        shift = max(0, sum(map(len, pieces)) - len(text))
        tokens, offset = [], 0
        for i, (tid, piece) in enumerate(zip(ids, pieces)):
            if i == 0:
                tokens.append(Token(tid, piece, None, [], 0))
            else:
                lp = logits[i - 1].float().log_softmax(-1)
                tokens.append(Token(tid, piece, float(lp[tid]), self._top(lp, top_n), max(0, offset - shift)))
            offset += len(piece)
        return tokens

    def _steps(self, stream: TokenStream, params: SamplingParams, seed: int, top_n: int) -> Iterator[Token | None]:
        """One token per step; None at EOS. The next forward pass runs only when the caller asks for more."""
        for step in stream.tokens(params, seed):
            if step is None:
                yield None
                return
            tid, lp = step
            self.decode_steps += 1
            yield Token(tid, self.decode([tid], False), float(lp[tid]), self._top(lp, top_n))

    def _decode(self, stream, params, seed, top_n, on_delta, cancel) -> Completion:
        holdback = max((len(s) for s in params.stop), default=1) - 1
        ids: list[int] = []
        tokens: list[Token] = []
        text, emitted, sent_tokens, finish, stopped = "", 0, 0, "length", False
        steps = self._steps(stream, params, seed, top_n)
        while (token := self.call(lambda: next(steps, _END))) is not _END:  # each step on the model's thread
            if cancel is not None and cancel.is_set():
                return Completion(text, "cancelled", len(ids), tokens)
            if token is None:
                finish = "stop"
                break
            token.offset = len(text)
            ids.append(token.id)
            tokens.append(token)
            text, stopped = cut_at_stop(self.decode(ids), params.stop)
            if stopped:
                finish = "stop"
                break
            safe = len(text) - holdback - (1 if text.endswith("\ufffd") else 0)
            if on_delta is not None and safe > emitted:
                on_delta(text[emitted:safe], tokens[sent_tokens:])
                emitted, sent_tokens = safe, len(tokens)
        if stopped:  # drop the tokens that only spelled the stop string
            tokens = [t for t in tokens if t.offset < len(text)]
        if on_delta is not None and (len(text) > emitted or len(tokens) > sent_tokens):
            on_delta(text[emitted:], tokens[sent_tokens:])
        return Completion(text, finish, len(ids), tokens)


# ------------------------------------------------------------------------------ the engine

class Engine:
    """The model behind one server: the `Batcher` (whose thread runs the model), and an `HFRunner` when the
    backend is an `HFBackend`.

    Plain requests go through the batcher (any backend); streaming, log-probs and token-id prompts
    need the model itself, so they run on the `HFRunner`, token by token.

    Args:
        backend: any `Backend`.
        max_batch: most concurrent requests gathered into one ``generate`` call.
        batch_wait_s: how long the first request of a batch waits for others to join.
    """

    def __init__(self, backend: Backend, max_batch: int = 16, batch_wait_s: float = 0.005) -> None:
        self.backend = backend
        self.batcher = Batcher(backend, max_batch, batch_wait_s)
        self.runner = HFRunner(backend, self.batcher.call) if isinstance(backend, HFBackend) else None

    def close(self) -> None:
        """Stop the batching thread (requests already queued are answered first)."""
        self.batcher.close()

    def token_prompt(self, ids: list[int]) -> str:
        """The text of a prompt given as token ids.

        Raises:
            CaiError: the backend takes text only, or an id is outside the vocabulary.
        """
        if self.runner is None:
            raise CaiError("this server's backend takes text prompts only")
        vocab = len(self.runner.tokenizer)
        if not all(0 <= t < vocab for t in ids):
            raise CaiError(f"prompt token ids must be in [0, {vocab})")
        return self.runner.decode(ids, False)

    def generate(
        self,
        prompt: str,
        prompt_ids: list[int] | None,
        params: SamplingParams,
        seed: int,
        top_n: int | None = None,
        *,
        on_delta: Callable[[str, list[Token]], None] | None = None,
        on_prompt: Callable[[list[Token]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """One completion of ``prompt`` (blocking): token by token when log-probs (``top_n``), token ids,
        streaming (``on_delta``) or prompt scores (``on_prompt``) ask for it, else through the batcher.

        Raises:
            ContextLengthError: the prompt plus ``max_tokens`` won't fit.
            CaiError: the request needs an `HFBackend` and this backend is not one, or the backend refused it.
        """
        runner = self.runner
        if runner is not None and (top_n is not None or on_delta is not None or prompt_ids is not None):
            ids = prompt_ids if prompt_ids is not None else self.backend.encode([prompt])[0]
            echo_text = prompt if on_prompt is not None else None
            gen = runner.run(ids, params, seed, top_n or 0, echo_text, on_delta=on_delta, on_prompt=on_prompt,
                             cancel=cancel)[1]
            gen.prompt_tokens = len(ids)
            return gen
        if top_n is not None or prompt_ids is not None:
            raise CaiError("this server's backend can't return log-probs or take token ids")
        n_prompt = self.backend.count_tokens(prompt)
        check_context(n_prompt, params.max_new_tokens, self.backend.context_length)
        text = self.batcher.submit(prompt, params, seed)
        if on_delta is not None:
            on_delta(text, [])
        # The backend returns text only, so its tokens are counted again (re-encoding can differ a
        # little from what was generated); a full budget is taken to mean the text was cut short.
        used = min(self.backend.count_tokens(text), params.max_new_tokens) if text else 0
        return Completion(text, "length" if used >= params.max_new_tokens else "stop", used, prompt_tokens=n_prompt)

    def score_prompt(self, prompt: str, prompt_ids: list[int] | None, top_n: int | None) -> Completion:
        """The prompt alone (``max_tokens=0`` with ``echo``): its token count and, given ``top_n``, its scored tokens.

        Raises:
            CaiError: log-probs were asked for and the backend is not an `HFBackend`.
        """
        if top_n is None:
            n = len(prompt_ids) if prompt_ids is not None else self.backend.count_tokens(prompt)
            return Completion(prompt, "length", 0, None, n)
        if self.runner is None:
            raise CaiError("this server's backend can't return log-probs")
        ids = prompt_ids if prompt_ids is not None else self.backend.encode([prompt])[0]
        tokens = self.runner.run(ids, None, 0, top_n, echo_text=prompt)[0]
        return Completion(prompt, "length", 0, tokens, len(ids))
