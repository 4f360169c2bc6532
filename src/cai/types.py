"""Small shared types: chat messages and conversations."""

from typing import Literal, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Chat = list[Message]
"""A conversation in the Hugging Face chat format: ``[{"role": ..., "content": ...}, ...]``."""
