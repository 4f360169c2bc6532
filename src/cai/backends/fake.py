"""A deterministic backend for tests: no model, instant, scriptable.

By default a generation is a short pseudo-random sentence derived from a hash of the rendered
prompt and the row's seed, and a choice log-probability is a hash-derived number in [-6, -0.05].
Tests that need specific behaviour pass ``respond`` and ``score`` callables instead.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

from cai.backends.base import Prompt, ProgressFn, cut_at_stop, seeds_per_row
from cai.errors import CaiError
from cai.types import SamplingParams

_WORDS = (
    "the assistant considers this request carefully and explains that safety matters while staying "
    "helpful honest kind clear about risks offering safer alternatives and useful context"
).split()


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


class FakeBackend:
    """`Backend` with deterministic, hash-based or scripted outputs.

    Args:
        respond: ``respond(rendered_prompt, seed) -> text`` replaces the default generation.
        score: ``score(prompt, option) -> logprob`` replaces the default choice scoring.

    Every call is recorded in ``calls`` as ``(method, rendered prompts)`` for assertions.
    """

    def __init__(
        self,
        respond: Callable[[str, int], str] | None = None,
        score: Callable[[str, str], float] | None = None,
    ) -> None:
        self.respond = respond
        self.score = score
        self.calls: list[tuple[str, list[str]]] = []
        self.context_length: int | None = None
        self.has_chat_template = True
        self.closed = False

    def close(self) -> None:
        """Mark the backend closed: later calls fail, as with a real backend that freed its model."""
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise CaiError("this model backend was closed; load the model again to use it")

    def count_tokens(self, prompt: Prompt) -> int:
        """Whitespace-separated words stand in for tokens."""
        return len(self.render(prompt).split())

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise CaiError("a chat prompt has no messages")
        parts = [f"<|{m['role']}|>\n{m['content']}" for m in prompt]
        if prompt[-1]["role"] == "assistant":
            return "\n".join(parts)  # continue the final assistant message
        return "\n".join(parts) + "\n<|assistant|>\n"

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[str]:
        self._check_open()
        texts = [self.render(p) for p in prompts]
        self.calls.append(("generate", texts))
        row_seeds = seeds_per_row(seeds, params.seed, len(texts))
        out = []
        for i, text in enumerate(texts):
            if not text.strip():
                raise CaiError(f"prompt {i} is empty")
            # Greedy output must not depend on the seed, as with a real model.
            seed_part = 0 if params.greedy else row_seeds[i]
            if self.respond is not None:
                reply = self.respond(text, seed_part)
            else:
                h = _digest(text, seed_part)
                n = 4 + h[0] % 8
                reply = " ".join(_WORDS[b % len(_WORDS)] for b in h[1:1 + n]).capitalize() + "."
            words = reply.split(" ")
            reply = " ".join(words[: params.max_new_tokens])
            out.append(cut_at_stop(reply, params.stop)[0].strip())
        if progress is not None:
            progress(len(out), sum(len(o.split()) for o in out))
        return out

    def choice_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        self._check_open()
        self.calls.append(("choice_logprobs", list(prompts)))
        if not options:
            raise CaiError("choice_logprobs needs at least one option")
        result = []
        for prompt in prompts:
            row = []
            for option in options:
                if self.score is not None:
                    row.append(float(self.score(prompt, option)))
                else:
                    h = _digest(prompt, option)
                    row.append(-0.05 - 5.95 * int.from_bytes(h[:4], "big") / 2**32)
            result.append(row)
        return result
