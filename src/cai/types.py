"""Small shared types: chat messages, conversations and sampling settings.

Kept free of heavy imports (only `cai.errors`, a leaf), so that configs, backends and stages can
all import them without importing each other.
"""

from dataclasses import dataclass, field
from typing import Literal, TypedDict

from cai.errors import CaiError

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Chat = list[Message]
"""A conversation in the Hugging Face chat format: ``[{"role": ..., "content": ...}, ...]``."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a continuation.

    Attributes:
        max_new_tokens: hard cap on generated tokens per row.
        temperature: 0 means greedy decoding; otherwise logits are divided by it.
        top_p: nucleus sampling mass (1.0 disables it).
        top_k: keep the k most likely tokens (0 disables it).
        seed: base seed; row i of a call samples from its own generator seeded from
            ``(seed, i)`` unless the caller passes explicit per-row seeds, so results don't
            depend on batch size or on which rows share a batch.
        stop: strings that end a row's output; the output is cut before the first one.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CaiError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CaiError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CaiError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CaiError(f"top_k must be 0 (off) or positive, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
