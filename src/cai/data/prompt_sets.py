"""A stage's prompt set, from its config section to rows that fit the model's context.

Every stage that reads prompts (critique, sample, ppo, eval) goes through these two functions,
so the load summary a user sees and the too-long policy are the same everywhere.
"""

from __future__ import annotations

from typing import Any, Callable

from rich.console import Console

from cai.config import PromptSetConfig
from cai.data.loaders import LoadReport, PromptRow, fit_to_context, load_prompts

console = Console(stderr=True)


def load_prompt_set(prompt_cfg: PromptSetConfig, what: str) -> list[PromptRow]:
    """The rows a `PromptSetConfig` names (source, split, limit), with a one-line summary.

    Raises:
        CaiError: the source can't be read (named in the sentence).
    """
    rows, report = load_prompts(prompt_cfg.source, split=prompt_cfg.split, limit=prompt_cfg.limit)
    console.print(f"{what}: {report.summary()}")
    return rows


def fit_prompt_set(rows: list[PromptRow], counter: Any, budget: int, policy: str, what: str,
                   build: Callable[[Any], Any] | None = None) -> list[PromptRow]:
    """Drop or left-truncate prompts whose stage prompt plus generation budget overflow the context.

    Args:
        counter: anything with ``count_tokens(prompt)`` and ``context_length`` (a backend, or a
            `cai.backends.base.TokenCounter` when no weights are loaded); no context length = no limit.
        budget: tokens the stage will generate after the prompt.
        policy: the prompt set's ``too_long`` ("truncate_left" or "drop").
        build: turns a row's chat into the prompt the stage really sends (e.g. a critique prompt
            around it); by default the chat itself.
    """
    context = getattr(counter, "context_length", None)
    if not context:
        return rows
    build = build or (lambda chat: chat)
    report = LoadReport(source=what, read=len(rows), kept=len(rows))
    fitted = fit_to_context(rows, lambda chat: counter.count_tokens(build(chat)) + budget, context, policy=policy,
                            report=report)
    if report.truncated or report.dropped_too_long:
        console.print(f"{what}: {report.truncated} prompts shortened and {report.dropped_too_long} dropped to fit "
                      f"the model's {context}-token context")
    return fitted
