"""The constitution: principles the model critiques and judges itself by, plus few-shot examples.

A constitution has two lists of principles, one per stage of Constitutional AI:

- critique/revision principles (SL-CAI): a request to criticise a response and a request to
  rewrite it; one is drawn at random for each revision round;
- feedback principles (RL-CAI): a multiple-choice question asking which of two responses is
  better; one is drawn at random for each AI label. A feedback principle may also carry a pair
  of RLCD statements (`RlcdStatements`), for sampling pairs whose preference is known by
  construction instead of asking a judge.

and three lists of few-shot examples that are placed, identically, in front of every prompt.

This module is the data model, the seeded sampling and the display; it knows nothing of files.
Constitutions are stored as YAML (see ``constitutions/default.yaml``): loading one by name or
path, validating it and writing it back live in ``cai.constitution_yaml``, which imports this
module.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cai.errors import CaiError
from cai.types import Chat

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class CritiquePrinciple:
    """One principle for the critique -> revision loop."""

    id: str
    critique_request: str
    revision_request: str


@dataclass(frozen=True)
class RlcdStatements:
    """A feedback principle's contrast pair for RLCD (Yang et al., 2023): two system-turn statements.

    ``follow`` asks the assistant to answer by the principle and ``violate`` to answer against it.
    The sampling stage draws one answer to a prompt under each, and the ``follow`` answer is
    preferred by construction: no judge is asked. The statements only shape a contrast sample;
    the prompt the preference model and the policy learn from carries neither.
    """

    follow: str
    violate: str


@dataclass(frozen=True)
class FeedbackPrinciple:
    """One principle for AI feedback: a question comparing two responses, and optionally the
    RLCD statements (``rlcd``) that sample a contrast pair under it."""

    id: str
    question: str
    rlcd: RlcdStatements | None = None


@dataclass(frozen=True)
class CritiqueRevisionExample:
    """A worked critique and revision of ``response``, the assistant's reply to ``conversation``."""

    conversation: Chat
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass(frozen=True)
class FeedbackExample:
    """A worked multiple-choice comparison: ``answer`` names the better response."""

    conversation: Chat
    response_a: str
    response_b: str
    question: str
    answer: Literal["A", "B"]


@dataclass(frozen=True)
class CotFeedbackExample:
    """Like `FeedbackExample`, with step-by-step ``reasoning`` written before the answer."""

    conversation: Chat
    response_a: str
    response_b: str
    question: str
    reasoning: str
    answer: Literal["A", "B"]


@dataclass(frozen=True)
class Constitution:
    """A whole constitution. Loaded constitutions always have at least one principle of each kind.

    Frozen, but not hashable: example conversations are lists (the HF chat format).
    """

    name: str
    description: str
    version: str
    critique_revision_principles: tuple[CritiquePrinciple, ...]
    feedback_principles: tuple[FeedbackPrinciple, ...]
    critique_revision_examples: tuple[CritiqueRevisionExample, ...] = ()
    feedback_examples: tuple[FeedbackExample, ...] = ()
    cot_feedback_examples: tuple[CotFeedbackExample, ...] = ()


# --------------------------------------------------------------------------- seeded sampling
# Each row gets its own generator seeded from (seed, key, purpose). A string seed is hashed with
# SHA-512 by `random.Random`, so the draw is the same in every process and does not depend on
# PYTHONHASHSEED, on the order rows are processed, or on which other rows exist: a resumed or
# sharded run draws exactly what a single uninterrupted run would.


def _check_n(n: int) -> None:
    if n < 0:
        raise CaiError(f"The number of principles to sample must be 0 or more, not {n}.")


def sample_critique_principles(
    constitution: Constitution, n: int, seed: int, key: str
) -> list[CritiquePrinciple]:
    """Draw ``n`` critique/revision principles (with replacement) for the row ``key``.

    The first ``k`` draws do not depend on ``n``, so asking for more rounds extends the list.
    """
    _check_n(n)
    rng = random.Random(f"{seed}:{key}:critique_revision")
    return [rng.choice(constitution.critique_revision_principles) for _ in range(n)]


def sample_feedback_principles(
    constitution: Constitution, n: int, seed: int, key: str
) -> list[FeedbackPrinciple]:
    """Draw ``n`` feedback principles (with replacement) for the row ``key``; see above."""
    _check_n(n)
    rng = random.Random(f"{seed}:{key}:feedback")
    return [rng.choice(constitution.feedback_principles) for _ in range(n)]


# --------------------------------------------------------------------------- display


def constitution_summary(constitution: Constitution) -> str:
    """One line naming a constitution and counting its parts (what ``cai constitution validate`` prints).

    Returns:
        Plain text (not rich markup), e.g. ``"default (version 1.0): 18 critique/revision
        principles, 18 feedback principles (18 with RLCD statements), ..."``.
    """
    c = constitution
    with_rlcd = sum(p.rlcd is not None for p in c.feedback_principles)
    return (
        f"{c.name} (version {c.version}): {len(c.critique_revision_principles)} critique/revision "
        f"principles, {len(c.feedback_principles)} feedback principles ({with_rlcd} with RLCD statements), "
        f"{len(c.critique_revision_examples)} critique/revision examples, "
        f"{len(c.feedback_examples)} feedback examples, "
        f"{len(c.cot_feedback_examples)} chain-of-thought feedback examples"
    )


def show_constitution(constitution: Constitution, console: Console) -> None:
    """Print a constitution as readable tables: principles with their ids, then example counts."""
    from rich.markup import escape
    from rich.table import Table

    # Constitution text is user data: escape it so "[...]" in a principle is not read as markup.
    c = constitution
    console.print(f"[bold]{escape(c.name)}[/bold]  version {escape(c.version)}")
    console.print(escape(c.description.strip()))

    table = Table(title="Critique / revision principles", show_lines=True, expand=True)
    table.add_column("id", style="cyan", no_wrap=True)
    table.add_column("critique request")
    table.add_column("revision request")
    for p in c.critique_revision_principles:
        table.add_row(escape(p.id), escape(p.critique_request), escape(p.revision_request))
    console.print(table)

    table = Table(title="Feedback principles", show_lines=True, expand=True)
    table.add_column("id", style="cyan", no_wrap=True)
    table.add_column("question")
    table.add_column("RLCD statements (follow / violate)")
    for f in c.feedback_principles:
        rlcd = f"follow: {f.rlcd.follow}\nviolate: {f.rlcd.violate}" if f.rlcd else "-"
        table.add_row(escape(f.id), escape(f.question), escape(rlcd))
    console.print(table)

    table = Table(title="Few-shot examples")
    table.add_column("kind")
    table.add_column("count", justify="right")
    table.add_row("critique / revision", str(len(c.critique_revision_examples)))
    table.add_row("feedback (multiple choice)", str(len(c.feedback_examples)))
    table.add_row("feedback (chain of thought)", str(len(c.cot_feedback_examples)))
    console.print(table)
