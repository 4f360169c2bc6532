"""The one interface every stage uses to talk to a model.

Stages never call transformers, vLLM or an HTTP server directly: they hold a `Backend` and
call `generate` and `choice_logprobs`. Swapping the engine (a laptop CPU, vLLM on a GPU, a
remote server) then changes one config line, and tests run every stage on the `fake` backend.

Conventions shared by all backends:

- A prompt is either a `Chat` (rendered with the model's chat template) or a plain `str`
  (used as is, for completion models and for prompts that were already rendered).
- A chat whose last message has role ``assistant`` is *continued*: the model writes the rest of
  that message (an answer lead-in such as ``"The answer is:"``). Otherwise the chat template's
  generation prompt opens a new assistant message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

from cai.errors import CaiError
from cai.models import resolve_model_path
from cai.types import Chat

if TYPE_CHECKING:
    from cai.types import SamplingParams

Prompt = Chat | str

ProgressFn = Callable[[int, int], None]
"""Called after each finished batch with (rows finished, new tokens generated) for that batch."""


@runtime_checkable
class Backend(Protocol):
    """What a stage may ask of a model."""

    context_length: int | None
    """Most tokens (prompt + output) the model takes; None when unknown or unlimited."""
    has_chat_template: bool

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees for a prompt (chat template applied to chats)."""
        ...

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens the rendered prompt takes."""
        ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        progress: ProgressFn | None = None,
    ) -> list[str]:
        """One continuation per prompt, in input order, cut at EOS and at ``params.stop``."""
        ...

    def choice_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """``result[i][j]`` = log P(options[j] | prompts[i]), summed over the option's tokens."""
        ...

    def close(self) -> None:
        """Free the model (weights, caches, connections); the backend answers nothing afterwards.

        A stage that is done with a model closes it, so the next model never loads beside it.
        """
        ...


def render_with_template(tokenizer: Any, prompt: Prompt, missing: str) -> str:
    """Render a prompt with a tokenizer's chat template, continuing a final assistant message.

    Args:
        missing: the sentence to raise when there is no tokenizer or no template.
    """
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise CaiError("a chat prompt has no messages")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise CaiError(missing)
    continue_final = prompt[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=not continue_final,
                                         continue_final_message=continue_final)


def encode_rendered(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of already rendered texts, the same way in every backend.

    Special tokens come from the chat template, so none are added, except the BOS that a
    tokenizer like Llama's puts before raw text (unless the text already starts with it).
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [row if text.startswith(bos_text) else [bos, *row] for row, text in zip(ids, texts)]
    return ids


def count_prompt_tokens(tokenizer: Any, prompt: Prompt) -> int:
    """Tokens a prompt takes once rendered and encoded: the one counting rule of every local backend."""
    rendered = render_with_template(tokenizer, prompt, "this model's tokenizer has no chat template; pass plain-text "
                                    "prompts or use a chat model")
    return len(encode_rendered(tokenizer, [rendered])[0])


class TokenCounter:
    """A model's tokenizer alone (no weights), counting prompt tokens by the rule every backend uses.

    It stands in for a backend where only `Backend.count_tokens` and ``context_length`` are
    needed: stages that fit prompts to a context before any model is loaded (PPO, RLOO, GRPO).
    """

    def __init__(self, spec: str) -> None:
        from transformers import AutoConfig, AutoTokenizer  # lazy: transformers takes seconds to import

        path, _ = resolve_model_path(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.context_length = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)

    def count_tokens(self, prompt: Prompt) -> int:
        return count_prompt_tokens(self.tokenizer, prompt)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string. Returns (text, whether a stop was found)."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut], cut != len(text)


def stable_seed(seed: int, *parts: object) -> int:
    """A seed derived from a base seed and names (row id, step): independent of row order."""
    import hashlib

    digest = hashlib.sha256("\x1f".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def row_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for row ``index`` of a call seeded with ``seed``."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


def seeds_per_row(seeds: Sequence[int] | None, seed: int, count: int) -> list[int]:
    """The sampling seed of each of ``count`` prompts in one ``generate`` call, the same way in every backend.

    Args:
        seeds: the caller's seeds, one per prompt (stages derive them from row ids), or None.
        seed: the call's ``params.seed``, from which row ``i`` gets `row_seed` ``(seed, i)`` when
            ``seeds`` is None.

    Raises:
        CaiError: ``seeds`` is given and does not hold one seed per prompt.
    """
    if seeds is None:
        return [row_seed(seed, i) for i in range(count)]
    if len(seeds) != count:
        raise CaiError(f"got {len(seeds)} seeds for {count} prompts")
    return list(seeds)
