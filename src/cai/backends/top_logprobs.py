"""Answer options read off the few most likely next tokens that a server reports.

A server that won't return the log-probs of prompt tokens (OpenAI's chat API and most hosted
gateways, llama.cpp's server, vLLM's chat route) still reports, for each token it generates, the
k most likely tokens at that position with their log-probs (k is at most 20 on every common
server). Asked for one token right where the options start to differ, it has told us how likely
each option's start is. For cai's options, ``" (A)"`` and ``" (B)"`` after ``"The answer is:"``,
the shared ``" ("`` goes into the prompt and the options are read as the next tokens ``A`` and ``B``.

What is measured is log P(next token starts option j's remainder): exact when the remainder is one
token, and for a longer one the log-prob of its first token only (the ``")"`` after ``"A"`` is
near certain after either answer, so it would not change which option wins).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from cai.errors import CaiError

ABSENT_GAP = math.log(2)
"""How far below the smallest listed log-prob an unlisted option is put (see `fill_absent`)."""


def fold_common_prefix(options: Sequence[str]) -> tuple[str, list[str]]:
    """Split the options' shared start (to append to the prompt) from what is left of each option.

    The shared start is cut back so that it ends neither inside a word (``"Yes"`` and ``"Yellow"``
    share ``"Ye"``, which no tokenizer splits off) nor in whitespace (a BPE tokenizer attaches a
    space to the token after it): the prompt plus the shared start then tokenizes as the prompt
    plus a whole option would, up to where the options differ.

    Returns:
        ``(prefix, remainders)`` with ``prefix + remainders[j] == options[j]``.

    Raises:
        CaiError: an option has nothing but whitespace after the shared start, or one option's
            remainder starts with another's, so no single next token tells them apart.
    """
    prefix = os.path.commonprefix(list(options)) if len(options) > 1 else ""
    n = len(prefix)
    if n and prefix[-1].isalnum() and any(len(o) > n and o[n].isalnum() for o in options):
        while n and prefix[n - 1].isalnum():
            n -= 1
    prefix = prefix[:n].rstrip()
    remainders = [o[len(prefix):] for o in options]
    keys = [r.strip() for r in remainders]
    for j, key in enumerate(keys):
        if not key:
            raise CaiError(f"option {j} ({options[j]!r}) has nothing after the start all options share "
                           f"({prefix!r}), so its next token can't be read off the server's top log-probs")
        for k, other in enumerate(keys):
            if k != j and other.startswith(key):
                raise CaiError(f"options {j} ({options[j]!r}) and {k} ({options[k]!r}) start alike after their "
                               "shared part, so one next token can't tell them apart; use options that differ "
                               "in their first character")
    return prefix, remainders


def read_options(top: Sequence[tuple[str, float]], remainders: Sequence[str]) -> list[float | None]:
    """Each option's log-prob among one position's top candidates; None where none of them starts it.

    A candidate token counts for option j when its text, stripped of surrounding whitespace, is a
    non-empty start of option j's stripped remainder and of no other option's. Several candidates
    counting for one option (``" A"`` and ``"A"``, or ``"A"`` and ``"A)"``) are different ways of
    starting it, so their probabilities are added (log-sum-exp).

    Args:
        top: ``(token text, log-prob)`` pairs, as the server listed them.
        remainders: what is left of each option after `fold_common_prefix`.
    """
    keys = [r.strip() for r in remainders]
    found: list[list[float]] = [[] for _ in keys]
    for token, logprob in top:
        piece = token.strip()
        if not piece:
            continue
        owners = [j for j, key in enumerate(keys) if key.startswith(piece)]
        if len(owners) == 1:
            found[owners[0]].append(logprob)
    return [_logsumexp(values) if values else None for values in found]


def fill_absent(scores: Sequence[float | None], top: Sequence[tuple[str, float]]) -> list[float]:
    """Put a stand-in for the options that were not among the top candidates.

    Such an option's log-prob is at most the smallest listed one (it would otherwise have been
    listed); the stand-in is that bound minus log 2, which keeps the option below every listed
    option without claiming to know how far below. It is an upper-bound stand-in, not a
    measurement: the true log-prob may be much lower.
    """
    floor = min(lp for _, lp in top) - ABSENT_GAP
    return [floor if s is None else s for s in scores]


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))
