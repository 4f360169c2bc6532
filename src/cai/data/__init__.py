"""Prompt sets: the built-in red-team and helpfulness prompts, and loaders for your own."""

from cai.data.loaders import (
    ROW_FORMATS,
    LoadReport,
    PromptRow,
    fit_to_context,
    load_prompts,
    show_prompts,
)
from cai.data.sources import BUILTIN_SETS

__all__ = [
    "BUILTIN_SETS",
    "ROW_FORMATS",
    "LoadReport",
    "PromptRow",
    "fit_to_context",
    "load_prompts",
    "show_prompts",
]
