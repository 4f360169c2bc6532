"""The model side of ``cai serve``: request batching and token-level decoding.

`cai.serve` speaks HTTP; this module does the work it hands over, in two ways:

- `Batcher` gathers plain generation requests from many connections into shared
  ``backend.generate`` calls (any `Backend`).
- `HFRunner` decodes one request token by token and scores prompt tokens straight on an
  `HFBackend`'s model, for streaming, log-probs and ``echo``. The log-probs it reports are the
  model's own (log-softmax of its logits, before temperature, top-k or top-p).

Both take the server's one model lock, so only one forward pass runs at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from cai.backends.base import Backend, cut_at_stop
from cai.errors import CaiError
from cai.types import SamplingParams


class ContextLengthError(CaiError):
    """A prompt plus ``max_tokens`` is longer than the model's context (the server answers 400)."""


# ------------------------------------------------------------------------------ batching

@dataclass
class _Job:
    prompt: str
    params: SamplingParams
    seed: int
    future: Future


class Batcher:
    """Runs plain generation requests in shared ``backend.generate`` calls, one call at a time.

    The first waiting request opens a batch; whatever else arrives within ``wait_s`` (or queued
    up while the model was busy) joins it, up to ``max_batch``. Requests with different sampling
    settings run as separate calls; each row keeps its own seed, so batching never changes a result.
    """

    def __init__(self, backend: Backend, lock: threading.Lock, max_batch: int, wait_s: float) -> None:
        self.backend, self.lock, self.max_batch, self.wait_s = backend, lock, max_batch, wait_s
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="cai-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: str, params: SamplingParams, seed: int) -> str:
        job = _Job(prompt, params, seed, Future())
        self.queue.put(job)
        return job.future.result()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            jobs, deadline, closing = [job], time.monotonic() + self.wait_s, False
            while len(jobs) < self.max_batch:
                try:
                    more = self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                jobs.append(more)
            groups: dict[SamplingParams, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(replace(j.params, seed=0), []).append(j)
            for params, group in groups.items():
                self._run(params, group)
            if closing:
                return

    def _run(self, params: SamplingParams, group: list[_Job]) -> None:
        try:
            with self.lock:
                texts = self.backend.generate([j.prompt for j in group], params, seeds=[j.seed for j in group])
        except Exception as err:  # noqa: BLE001 - handed to the waiting request threads
            if len(group) > 1:  # one bad prompt must not fail its neighbours: run them alone
                for j in group:
                    self._run(params, [j])
                return
            group[0].future.set_exception(err)
            return
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
    """``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_tokens``)."""
    completion_tokens: int
    """Tokens generated (the API's ``usage.completion_tokens``)."""
    tokens: list[Token] | None = None
    """The tokens with their log-probs when `HFRunner` decoded them; None from the `Batcher` path."""


class HFRunner:
    """Single-row decoding and prompt scoring straight on an `HFBackend`'s model.

    Sampling uses `HFBackend.next_tokens` with a generator seeded like the backend's rows, so a
    seeded request gives the same tokens here as through ``HFBackend.generate``.
    """

    def __init__(self, backend: Any, lock: threading.Lock) -> None:
        self.backend, self.lock = backend, lock
        self.tokenizer = backend.tokenizer

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
    ) -> tuple[list[Token] | None, Completion | None]:
        """Score the prompt's tokens (when ``echo_text`` is given) and generate (when ``params`` is).

        One forward pass over the prompt serves both. ``on_prompt(tokens)`` receives the scored
        prompt before decoding starts; ``on_delta(text, tokens)`` receives the completion as it
        grows, holding back text that could still turn out to start a stop string.
        """
        import torch
        from transformers import DynamicCache

        backend, model = self.backend, self.backend.model
        limit = backend.max_context
        if limit and len(prompt_ids) + (params.max_new_tokens if params else 0) > limit:
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens, which with max_tokens exceeds "
                                     f"the model's context of {limit} tokens")
        cache = DynamicCache()
        with self.lock, torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=backend.device)
            logits = model(input_ids=ids, cache=cache, use_cache=True,
                           logits_to_keep=0 if echo_text is not None else 1).logits[0]
        prompt_tokens = None if echo_text is None else self._score_prompt(prompt_ids, logits, top_n, echo_text)
        if on_prompt is not None and prompt_tokens is not None:
            on_prompt(prompt_tokens)
        if params is None:
            return prompt_tokens, None
        return prompt_tokens, self._decode(logits[-1:], cache, params, seed, top_n, on_delta)

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

    def _steps(self, logits: Any, cache: Any, params: SamplingParams, seed: int, top_n: int) -> Iterator[Token | None]:
        """One token per step; None at EOS. The next forward pass runs only when the caller asks for more."""
        import torch

        backend = self.backend
        generators = None if params.greedy else [torch.Generator(device=backend.device).manual_seed(seed)]
        for step in range(params.max_new_tokens):
            token = backend.next_tokens(logits, params, generators)
            tid = int(token[0])
            if tid in backend.eos_ids:
                yield None
                return
            lp = logits[0].float().log_softmax(-1)
            yield Token(tid, self.decode([tid], False), float(lp[tid]), self._top(lp, top_n))
            if step + 1 < params.max_new_tokens:
                with self.lock, torch.inference_mode():
                    logits = backend.model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1, :]

    def _decode(self, logits, cache, params, seed, top_n, on_delta) -> Completion:
        holdback = max((len(s) for s in params.stop), default=1) - 1
        ids: list[int] = []
        tokens: list[Token] = []
        text, emitted, sent_tokens, finish, stopped = "", 0, 0, "length", False
        for token in self._steps(logits, cache, params, seed, top_n):
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
