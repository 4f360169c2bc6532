"""The request bodies ``cai serve`` accepts, as typed pydantic models, and how a bad one is explained.

FastAPI validates every body against these models before a route runs. The models are strict
(a string is not an integer, ``1`` is not ``true``) and ignore fields they don't know, as OpenAI
servers do: vLLM's ``continue_final_message`` and ``add_generation_prompt``, ``user``,
``presence_penalty`` and the like are accepted and have no effect. `validation_message` turns
pydantic's error list into the one sentence of an OpenAI-style 400 answer, naming the field.

Defaults follow OpenAI: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 16 for completions; chats
default to 512 new tokens. Without ``seed`` each request draws a random one.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cai.types import Chat, SamplingParams

CHAT_DEFAULT_MAX_TOKENS = 512
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_TOP_LOGPROBS = 20
_SEED_MASK = (1 << 63) - 1


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with the request's token counts."""


class _Sampling(_Body):
    """The fields both endpoints share: which model, how to sample, whether to stream."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    """The newer name of ``max_tokens``; wins when both are given."""
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    """An extension (vLLM, llama.cpp); 0 or -1 means off."""
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported; send several requests instead")
        return n

    @property
    def new_tokens(self) -> int | None:
        """The ``max_tokens`` asked for (None: the endpoint's default)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, default_max_tokens: int) -> tuple[SamplingParams, int]:
        """The `SamplingParams` and the seed this request asks for (a random seed when it gives none).

        Raises:
            CaiError: a value `SamplingParams` refuses (e.g. ``max_tokens`` 0 where text must be generated).
        """
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        params = SamplingParams(
            max_new_tokens=self.new_tokens if self.new_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),  # vLLM spells "off" as -1
            stop=tuple(stop),
        )
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return params, seed & _SEED_MASK


class ContentPart(_Body):
    """One part of a message's content; only ``text`` parts are read (images and the like are dropped)."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    """``developer`` is OpenAI's newer name for ``system`` and is read as it."""
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``. A chat whose last message is the assistant's is continued."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def chat(self) -> Chat:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def top_n(self) -> int | None:
        """How many alternatives to report per token, or None when log-probs are not asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt, as text or as token ids (or a batch holding just one)."""

    prompt: str | list[int]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """The legacy form: how many alternatives to report per token (0 still reports the chosen one's)."""

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, value: Any, handler: Any) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        try:
            prompt = handler(value)
        except ValidationError:
            prompt = None
        if not prompt:
            raise ValueError("must be a non-empty string or list of token ids (one prompt per request)")
        return prompt


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One sentence for the first of pydantic's (or FastAPI's) validation errors, and the field it names.

    Returns:
        ``(message, param)``; ``param`` is the field's path as OpenAI writes it (``messages[0].role``),
        or None when the body as a whole is wrong (not JSON, not an object).
    """
    # A value that fits no member of a union (``stop: str | list[str]``) fails once per member; the
    # error that got deepest into the value says most. Member tags ("str", "list[str]") are not fields.
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [p for p in error.get("loc", ()) if p != "body" and not (isinstance(p, str) and (p == "str" or "[" in p))]
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', error.get('msg'))})", None
    if not loc or isinstance(loc[0], int):
        return "the request body must be a JSON object", None
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "missing":
        return f"`{param}` is required", param
    detail = str(ctx["error"]) if kind == "value_error" and "error" in ctx else error.get("msg", "is invalid")
    got = repr(error.get("input"))
    got = got if len(got) <= 40 else got[:37] + "..."
    return f"invalid `{param}`: {detail[:1].lower() + detail[1:]} (got {got})", param
