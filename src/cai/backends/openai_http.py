"""The HTTP backend: any OpenAI-compatible server (vLLM serve, llama.cpp server, TGI, Ollama, hosted APIs).

This module speaks the OpenAI protocol (request bodies, ``/completions``, ``/chat/completions``,
reading choices and log-probs). One request per prompt goes through `HTTPTransport`
(`cai.backends.http_transport`): several in flight at once, round-robin over one or more servers,
retries with backoff.

Chats and plain strings take different routes:

- ``mode="chat"``: a chat goes to ``/chat/completions`` as messages and the *server* applies the
  model's chat template. A chat whose last message is from the assistant is continued, by sending
  the vLLM extension fields ``continue_final_message=true, add_generation_prompt=false`` (other
  servers ignore them or, like llama.cpp, continue a final assistant message on their own).
- ``mode="completion"``: every prompt goes to ``/completions`` as text; chats are rendered locally,
  which needs ``tokenizer`` (the served model's tokenizer, for its chat template).
- A plain string always goes to ``/completions`` as is.

Choice scoring (``choice_logprobs``) needs the log-probability of text the model did *not* write,
which the completions endpoint gives with ``echo=true`` (vLLM, TGI's OpenAI route, the legacy
OpenAI API). Pass ``tokenizer`` and the prompt is sent as token ids, so the result is exactly what
`HFBackend.choice_logprobs` computes; without it the text is sent and the option's tokens are found
by their character offsets. Servers that refuse ``echo`` (llama.cpp) still work when every option is
a single token: its log-prob is read from the top-20 candidates for the next token.

A chat prompt (in ``mode="chat"``) is scored on ``/chat/completions`` instead, where the server
applies its own template and nothing needs rendering here: one token is asked for with
``logprobs=true, top_logprobs=20`` after the chat continued by the options' shared start, and each
option is read off those 20 candidates (`cai.backends.top_logprobs`). Continuing the assistant
turn uses vLLM's ``continue_final_message`` fields, which vLLM's chat route and cai serve read and
llama.cpp's server does on its own; a server that refuses unknown fields (OpenAI's own API answers
400) cannot score choices this way, and the label stage's ``auto`` then measures ``votes`` alone.

``cache_dir`` keeps every answer on disk by request (`cai.backends.http_transport`), so a rerun
sends nothing twice; ``usage`` counts what was sent and paid for.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from cai.backends.base import Prompt, ProgressFn, count_prompt_tokens, cut_at_stop, encode_rendered, render_with_template, seeds_per_row
from cai.backends.http_transport import HTTPRequestError, HTTPTransport
from cai.backends.top_logprobs import fill_absent, fold_common_prefix, read_options
from cai.errors import CaiError, LogprobsUnavailable, NoChoiceInTopLogprobs
from cai.models import resolve_model_path
from cai.types import Chat, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOP_LOGPROBS = 20
"""Next-token candidates asked for where options are read off them: the most OpenAI and vLLM allow."""


def _load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import; only a named tokenizer needs it

    path, is_local = resolve_model_path(spec)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=offline and not is_local)
    except (OSError, ValueError) as err:
        raise CaiError(f"could not load the tokenizer of '{spec}': {str(err).splitlines()[0]}") from err


class OpenAIHTTPBackend:
    """`Backend` over one or more OpenAI-compatible HTTP servers.

    Args:
        base_urls: server roots including the API prefix, e.g. ``http://10.0.0.5:8000/v1``; a URL
            with no path gets ``/v1``. Requests go round-robin over them (retries move on to the next).
        model: the model name the servers expect in the ``model`` field.
        api_key_env: environment variable holding the API key, read at every request and sent as
            ``Authorization: Bearer ...``; unset or empty means no header. The key itself is never stored.
        mode: ``chat`` (chats go to ``/chat/completions``) or ``completion`` (all prompts go to
            ``/completions`` as text).
        concurrency: most requests in flight at once.
        timeout_s: seconds one request may take (connect, read, write each).
        max_retries: retries after the first attempt, for 429, 5xx, connection errors and timeouts.
        backoff_s: delay before the first retry; it doubles after each (with jitter).
        max_backoff_s: longest delay between two retries (unless the server's ``Retry-After`` asks for more).
        tokenizer: the served model's tokenizer (a model spec as in `cai.models`, or a tokenizer object).
            Optional; it makes ``render`` of chats possible (the chat template is applied locally,
            needed for choice scoring of chats), ``count_tokens`` exact and ``choice_logprobs``
            send token ids.
        context_length: the served model's context, when known (None: unknown).
        cache_dir: a folder keeping every server answer by request (None: no cache); a request
            answered before is not sent again. See `HTTPTransport`.

    The connection arguments (``base_urls``, ``api_key_env``, ``concurrency``, ``timeout_s``, the
    retry ones and ``cache_dir``) go to `HTTPTransport` as they are.

    Attributes:
        can_render_chats: whether `render` works on chats (a local tokenizer with a chat template).
        scores_chats: whether `choice_logprobs` takes chats: in ``chat`` mode they are scored on
            ``/chat/completions`` from the top-20 next tokens; in ``completion`` mode they are
            rendered here (needs ``can_render_chats``) and scored on ``/completions``.

    Raises:
        CaiError: ``httpx`` is missing, or an argument is out of range.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        mode: Literal["chat", "completion"] = "chat",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        context_length: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if isinstance(base_urls, str):
            base_urls = [base_urls]
        if mode not in ("chat", "completion"):
            raise CaiError(f"mode must be 'chat' or 'completion', got {mode!r}")
        self.http = HTTPTransport(base_urls, api_key_env=api_key_env, concurrency=concurrency, timeout_s=timeout_s,
                                  max_retries=max_retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                                  cache_dir=cache_dir)
        self.base_urls = self.http.base_urls
        self.model = model
        self.api_key_env = api_key_env
        self.mode = mode
        self.concurrency = concurrency
        self.tokenizer = _load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.context_length = context_length
        template = self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None) is not None
        self.has_chat_template = mode == "chat" or template
        self.can_render_chats = template
        self.scores_chats = mode == "chat" or template
        self._echo_ok: bool | None = None  # learnt on the first choice_logprobs call

    def __repr__(self) -> str:
        return (
            f"OpenAIHTTPBackend(base_urls={self.base_urls!r}, model={self.model!r}, mode={self.mode!r}, "
            f"api_key_env={self.api_key_env!r}, concurrency={self.concurrency})"
        )

    @property
    def usage(self) -> dict[str, int]:
        """What this backend has cost so far: `HTTPTransport.usage` (requests, cache hits, tokens in and out)."""
        return self.http.usage()

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()

    def __enter__(self) -> OpenAIHTTPBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- prompts

    def render(self, prompt: Prompt) -> str:
        """The text for a prompt: strings as is; chats through the local tokenizer's chat template.

        Raises:
            CaiError: a chat without ``tokenizer`` (the server's template can't be seen from here).
        """
        return render_with_template(
            self.tokenizer, prompt,
            "the HTTP backend can't render a chat as text without the served model's chat template; "
            "set model.tokenizer (tokenizer= in OpenAIHTTPBackend) to the model's HF id or folder",
        )

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens of the rendered prompt: exact with ``tokenizer``, otherwise an estimate.

        The estimate is characters / 4 (rounded up), plus 4 tokens per chat message for the
        template's role markers: right for English text on common BPE vocabularies to within
        about 20%, so leave headroom when fitting prompts to a context.
        """
        if self.tokenizer is not None and (isinstance(prompt, str) or self.tokenizer.chat_template is not None):
            return count_prompt_tokens(self.tokenizer, prompt)
        if isinstance(prompt, str):
            return math.ceil(len(prompt) / 4)
        return sum(math.ceil(len(m["content"]) / 4) + 4 for m in prompt)

    def _encode(self, text: str) -> list[int]:
        """Token ids as `HFBackend.encode` makes them (a BOS the tokenizer adds to raw text, no other specials)."""
        return encode_rendered(self.tokenizer, [text])[0]

    # --------------------------------------------------------------------------- generate

    def _sampling_body(self, params: SamplingParams, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p,
            # 31 bits: the widest seed every common server accepts (llama.cpp takes a uint32).
            "seed": seed & 0x7FFFFFFF,
        }
        if params.top_k:
            body["top_k"] = params.top_k  # an extension (vLLM, llama.cpp, TGI, Ollama); OpenAI itself has none
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _generate_one(self, prompt: Prompt, params: SamplingParams, seed: int) -> tuple[str, int]:
        body = self._sampling_body(params, seed)
        if isinstance(prompt, list) and self.mode == "chat":
            if not prompt:
                raise CaiError("a chat prompt has no messages")
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
            if prompt[-1]["role"] == "assistant":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            answer = self.http.post("/chat/completions", body, keep=_has_choice)
            text = _first_choice(answer).get("message", {}).get("content") or ""
        else:
            body["prompt"] = self.render(prompt)
            answer = self.http.post("/completions", body, keep=_has_choice)
            text = _first_choice(answer).get("text") or ""
        text = cut_at_stop(text, params.stop)[0]
        used = (answer.get("usage") or {}).get("completion_tokens")
        return text, int(used) if isinstance(used, int) else math.ceil(len(text) / 4)

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[str]:
        """One request per prompt, ``concurrency`` in flight; texts in input order.

        Row i is sent ``seed = seeds[i]`` (or a seed derived from ``params.seed`` and i), so a server
        that honours seeds samples each row independently of the others. ``progress`` is called
        once per finished row with the server's completion token count (or an estimate).
        """
        if not prompts:
            return []
        row_seeds = seeds_per_row(seeds, params.seed, len(prompts))
        jobs = [lambda p=p, s=s: self._generate_one(p, params, s) for p, s in zip(prompts, row_seeds)]
        report = None if progress is None else (lambda _i, result: progress(1, result[1]))
        return [text for text, _ in self.http.run_all(jobs, report)]

    # ---------------------------------------------------------------------- choice scoring

    def choice_logprobs(self, prompts: Sequence[Prompt], options: Sequence[str]) -> list[list[float]]:
        """``result[i][j]`` = log P(options[j] | prompts[i]), by the best route the server offers.

        - A string goes to ``/completions``: exact, from the server's echoed prompt log-probs, or,
          where the server refuses ``echo``, read off its top-20 next tokens (single-token options).
        - A chat in ``chat`` mode goes to ``/chat/completions`` (`_chat_scores`): the options'
          shared start continues the chat's final assistant message (or opens one), one token is
          asked for with its top-20 candidates, and each option's log-prob is that of the first
          token of what is left of it (`cai.backends.top_logprobs`). An option missing from the
          top-20 while another is listed gets a stand-in below every listed log-prob (the smallest
          minus log 2, `fill_absent`): an upper bound, not a measurement.
        - A chat in ``completion`` mode is rendered with the local tokenizer and goes as a string.

        Raises:
            NoChoiceInTopLogprobs: for some chats no option was among the top-20; raised after all
                prompts are scored, with the whole result (``-inf`` for those chats' options).
            LogprobsUnavailable: the server answered a chat with no log-probs at all (judge by votes).
            CaiError: the options are empty or can't be told apart by one token; the server returns
                no prompt log-probs and the options are not all single tokens among its top-20; or a
                request failed.
        """
        if not prompts:
            return []
        if not options:
            raise CaiError("choice_logprobs needs at least one option")
        for j, option in enumerate(options):
            if not option:
                raise CaiError(f"option {j} ({option!r}) is empty")
        if self.mode == "completion":
            prompts = [self.render(p) for p in prompts]
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        result: list[list[float]] = [[] for _ in prompts]
        if texts:
            for i, row in zip(texts, self._text_scores([prompts[i] for i in texts], options, texts)):
                result[i] = row
        if chats:
            abstained = []
            for i, row in zip(chats, self._chat_scores([prompts[i] for i in chats], options)):
                if row is None:
                    abstained.append(i)
                    row = [-math.inf] * len(options)
                result[i] = row
            if abstained:
                shown = ", ".join(map(str, abstained[:10])) + (", ..." if len(abstained) > 10 else "")
                raise NoChoiceInTopLogprobs(
                    f"for {len(abstained)} of {len(prompts)} prompts (rows {shown}) none of the options "
                    f"{', '.join(map(repr, options))} was among the server's top-{TOP_LOGPROBS} next tokens, "
                    "so those prompts are abstentions", result, abstained)
        return result

    def _text_scores(self, prompts: Sequence[str], options: Sequence[str], rows: Sequence[int]) -> list[list[float]]:
        """Scores of plain-text prompts on ``/completions`` (``rows``: their indices in the caller's list)."""
        if self._echo_ok is not False:
            try:
                first = self._echo_score(prompts[0], options[0], rows[0], 0)
                self._echo_ok = True
            except _EchoRefused:
                self._echo_ok = False
            else:
                pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))][1:]
                scores = self.http.run_all(
                    [lambda i=i, j=j: self._echo_score(prompts[i], options[j], rows[i], j) for i, j in pairs])
                result = [[0.0] * len(options) for _ in prompts]
                result[0][0] = first
                for (i, j), score in zip(pairs, scores):
                    result[i][j] = score
                return result
        return self._top_logprobs_scores(prompts, options)

    def _chat_scores(self, chats: Sequence[Chat], options: Sequence[str]) -> list[list[float] | None]:
        """Each chat's option log-probs from ``/chat/completions``'s top-20 next tokens; None where none is listed."""
        prefix, remainders = fold_common_prefix(options)

        def score(chat: Chat) -> list[float] | None:
            if not chat:
                raise CaiError("a chat prompt has no messages")
            messages = [{"role": m["role"], "content": m["content"]} for m in chat]
            if messages[-1]["role"] == "assistant":
                messages[-1]["content"] += prefix
            elif prefix:
                messages.append({"role": "assistant", "content": prefix})
            body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                                    "logprobs": True, "top_logprobs": TOP_LOGPROBS}
            if messages[-1]["role"] == "assistant":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            answer = self.http.post("/chat/completions", body, keep=lambda a: bool(_chat_top_logprobs(a)))
            _first_choice(answer)  # an answer with no choices at all is broken, not merely without log-probs
            top = _chat_top_logprobs(answer)
            if not top:
                raise LogprobsUnavailable(
                    f"the server at {', '.join(self.base_urls)} answered /chat/completions with no log-probs "
                    f"(asked for logprobs=true, top_logprobs={TOP_LOGPROBS}), so '{self.model}' can't score "
                    "answers there; judge it by sampled votes instead")
            scores = read_options(top, remainders)
            return None if all(s is None for s in scores) else fill_absent(scores, top)

        return self.http.run_all([lambda c=c: score(c) for c in chats])

    def _echo_score(self, prompt: str, option: str, i: int, j: int) -> float:
        """log P(option | prompt) from one ``echo=true`` request over prompt + option."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        if self.tokenizer is not None:
            prompt_ids = self._encode(prompt)
            option_ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
            if not option_ids:
                raise CaiError(f"option {j} ({option!r}) has no tokens")
            body["prompt"] = prompt_ids + option_ids
        else:
            body["prompt"] = prompt + option
        try:
            answer = self.http.post("/completions", body, keep=_has_prompt_logprobs)
        except HTTPRequestError as err:
            if 400 <= err.status < 500 and err.status not in (401, 403, 404):
                raise _EchoRefused(str(err)) from err
            raise
        logprobs = _first_choice(answer).get("logprobs") or {}
        values = logprobs.get("token_logprobs") or []
        if self.tokenizer is not None:
            n_prompt = len(body["prompt"])
            picked = values[n_prompt - len(option_ids):n_prompt] if len(values) >= n_prompt else []
            if len(picked) != len(option_ids) or any(v is None for v in picked):
                raise _EchoRefused("the server returned no log-probs for the echoed prompt tokens")
            return float(sum(picked))
        offsets = logprobs.get("text_offset") or []
        if not values or len(offsets) != len(values):
            raise _EchoRefused("the server returned no log-probs for the echoed prompt")
        start, end = len(prompt), len(prompt) + len(option)
        picked = [v for v, o in zip(values, offsets) if start <= o < end]
        if start not in offsets:
            raise CaiError(
                f"the server tokenized the end of prompt {i} together with the start of option {j} ({option!r}), "
                "so that option's log-prob can't be read off; pass tokenizer=<the served model> to send token ids"
            )
        if not picked or any(v is None for v in picked):
            raise _EchoRefused("the server returned no log-probs for the option's tokens")
        return float(sum(picked))

    def _top_logprobs_scores(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Fallback without echo: the options must be single tokens, read off the next-token top-20."""
        if self.tokenizer is not None:
            for j, option in enumerate(options):
                if len(self.tokenizer(option, add_special_tokens=False)["input_ids"]) != 1:
                    raise CaiError(
                        f"the server can't return the log-probs needed for labels: it gives no prompt log-probs "
                        f"(echo), and option {j} ({option!r}) is more than one token; use a server that supports "
                        "echo=true with logprobs (e.g. vLLM) or single-token options"
                    )

        def score(prompt: str) -> list[float]:
            body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                    "logprobs": TOP_LOGPROBS}
            if self.tokenizer is not None:
                body["prompt"] = self._encode(prompt)
            logprobs = _first_choice(self.http.post("/completions", body, keep=_has_top_logprobs)).get("logprobs") or {}
            top = (logprobs.get("top_logprobs") or [None])[0] or {}
            if not top:
                raise LogprobsUnavailable(
                    f"the server at {', '.join(self.base_urls)} answered /completions with neither prompt log-probs "
                    f"(echo) nor top log-probs, so '{self.model}' can't score answers there; judge it by sampled votes instead")
            missing = [o for o in options if o not in top]
            if missing:
                raise CaiError(
                    f"the server can't return the log-probs needed for labels: it gives no prompt log-probs (echo), "
                    f"and option {missing[0]!r} is not among its top-{TOP_LOGPROBS} next tokens (it may be "
                    "more than one token); use a server that supports echo=true with logprobs, e.g. vLLM"
                )
            return [float(top[o]) for o in options]

        return self.http.run_all([lambda p=p: score(p) for p in prompts])


class _EchoRefused(CaiError):
    """The server won't return log-probs of prompt tokens; switch to the top-logprobs fallback."""


def _chat_top_logprobs(answer: dict[str, Any]) -> list[tuple[str, float]]:
    """The ``(token, log-prob)`` candidates listed for a chat answer's first token; empty when none came."""
    logprobs = _choice(answer).get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    first = content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else {}
    return [(str(e["token"]), float(e["logprob"])) for e in first.get("top_logprobs") or []
            if isinstance(e, dict) and "token" in e and isinstance(e.get("logprob"), (int, float))]


def _choice(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer's first choice; empty when it has none."""
    choices = answer.get("choices")
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}


def _first_choice(answer: dict[str, Any]) -> dict[str, Any]:
    choice = _choice(answer)
    if not choice:
        raise CaiError(f"the server's answer has no choices: {str(answer)[:200]}")
    return choice


# What makes an answer worth caching (`HTTPTransport.post`'s ``keep``): one that lacks what was asked
# for is asked again on a rerun, when the server may have been fixed.

def _has_choice(answer: dict[str, Any]) -> bool:
    return bool(_choice(answer))


def _legacy_logprobs(answer: dict[str, Any]) -> dict[str, Any]:
    logprobs = _choice(answer).get("logprobs")
    return logprobs if isinstance(logprobs, dict) else {}


def _has_prompt_logprobs(answer: dict[str, Any]) -> bool:
    return bool(_legacy_logprobs(answer).get("token_logprobs"))


def _has_top_logprobs(answer: dict[str, Any]) -> bool:
    return bool((_legacy_logprobs(answer).get("top_logprobs") or [None])[0])


def from_config(base_urls: str | Sequence[str], model: str, **kwargs: Any) -> OpenAIHTTPBackend:
    """Build the HTTP backend from config values.

    Args:
        base_urls: one URL, a comma-separated string of URLs, or a list
            (e.g. ``http://gpu1:8000/v1,http://gpu2:8000/v1``).
        model: the served model's name.
        **kwargs: any of ``api_key_env`` (default ``OPENAI_API_KEY``), ``mode`` (``chat`` |
            ``completion``), ``concurrency`` (8), ``timeout_s`` (60), ``max_retries`` (5),
            ``backoff_s`` (0.5), ``max_backoff_s`` (30), ``tokenizer`` (a model spec; None),
            ``context_length`` (None), ``cache_dir`` (None). See `OpenAIHTTPBackend`.

    Raises:
        CaiError: an unknown keyword or a bad value, named.
    """
    allowed = {"api_key_env", "mode", "concurrency", "timeout_s", "max_retries", "backoff_s", "max_backoff_s",
               "tokenizer", "context_length", "cache_dir"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise CaiError(f"unknown HTTP backend option {unknown[0]!r}; known options are {', '.join(sorted(allowed))}")
    if isinstance(base_urls, str):
        base_urls = [u for u in base_urls.split(",") if u.strip()]
    return OpenAIHTTPBackend(list(base_urls), model, **kwargs)
