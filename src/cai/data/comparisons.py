"""Human comparisons: two answers to one conversation and which one a person preferred.

Three forms are read, each into the same `Comparison`:

- **hh-rlhf rows**: ``chosen`` and ``rejected`` each hold the whole conversation, as a transcript
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) or as a list of messages. The two must share every
  turn but the last assistant answer: that shared part is the conversation being judged.
- **prompt/chosen/rejected rows** (TRL's preference format): ``prompt`` is text or messages, and
  each answer is text or messages ending with the assistant's answer.
- **``gold:<split>``**: the built-in gold pairs of that split (`cai.data.gold`), the better
  answer as chosen; only the pairs of the asked axis (helpfulness or harmlessness) are kept.

Nothing here loads a model, so the pipeline checks every row before the first stage starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cai.config import RLHFConfig
from cai.data.gold import BUILTIN, load_gold_pairs
from cai.data.loaders import parse_transcript
from cai.data.sources import BUILTIN_SETS, read_source
from cai.errors import CaiError
from cai.types import Chat

GOLD_PREFIX = "gold:"
"""``gold:dev`` / ``gold:test``: the built-in gold pairs of that split as human comparisons."""
AXES = ("helpfulness", "harmlessness")
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Comparison:
    """One human judgement: ``chosen`` was preferred to ``rejected`` as the next turn of ``context``."""

    context: Chat
    chosen: str
    rejected: str
    axis: str
    """``helpfulness`` or ``harmlessness``: what the person was judging."""

    @property
    def group(self) -> str:
        """The same for every comparison of one conversation, so a train/eval split keeps them together."""
        digest = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode("utf-8")).hexdigest()
        return f"human:{digest[:16]}"


def read_comparisons(source: str, axis: str) -> list[Comparison]:
    """Every comparison in ``source``, each labelled with ``axis``.

    Args:
        source: a file, a folder saved by ``datasets``, ``hf:NAME[:SPLIT]`` (as `read_source` reads
            them), or ``gold:dev`` / ``gold:test``.
        axis: ``helpfulness`` or ``harmlessness``: what a file's rows judge, and which gold pairs to keep.

    Raises:
        CaiError: an unreadable source, a source with no comparisons, or a malformed row (one sentence
            naming the source and the row).
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, not {axis!r}")
    if source == BUILTIN or source in BUILTIN_SETS:
        raise CaiError(f"{source!r} is not a set of comparisons; for the built-in gold pairs name a split, "
                       "gold:dev or gold:test, or give a file of chosen/rejected rows")
    if source.startswith(GOLD_PREFIX):
        gold = load_gold_pairs(BUILTIN, source[len(GOLD_PREFIX):])
        return [Comparison(g.messages, g.better, g.worse, axis) for g in gold if g.axis == axis]
    name, raw, _ = read_source(source, "train")
    if not raw:
        raise CaiError(f"{name} holds no comparisons; give rows with 'chosen' and 'rejected' columns")
    return [Comparison(*_parse_row(row, where), axis) for where, row in raw]


def rlhf_sources(config: RLHFConfig) -> list[tuple[str, str, str]]:
    """The sources an RLHF variant trains on, as (config key, source, axis).

    ``helpful`` reads ``helpful_data``; ``helpful-harmless`` reads it and ``harmless_data``.

    Raises:
        CaiError: a source the variant needs is null.
    """
    keys = [("helpful_data", "helpfulness")]
    if config.variant == "helpful-harmless":
        keys.append(("harmless_data", "harmlessness"))
    sources = []
    for key, axis in keys:
        source = getattr(config, key)
        if not source:
            raise CaiError(f"rlhf.{key} is null, but rlhf.variant={config.variant} trains on it; name a comparisons "
                           f"file, a saved dataset, an hf: id or gold:dev")
        sources.append((f"rlhf.{key}", source, axis))
    return sources


def _parse_row(row: dict[str, Any], where: str) -> tuple[Chat, str, str]:
    """(the shared conversation, the chosen answer, the rejected answer) of one row."""
    if row.get("chosen") in (None, "") or row.get("rejected") in (None, ""):
        raise CaiError(f"{where} needs 'chosen' and 'rejected' columns (hh-rlhf transcripts, or answers beside a "
                       f"'prompt' column); it has {', '.join(map(str, row)) or 'none'}")
    prompt = row.get("prompt")
    head = [] if prompt in (None, "") else _turns(prompt, "prompt", where)
    # Without a prompt column each side is a whole conversation; with one, plain text is the answer.
    answer_role = "assistant" if head else None
    chosen = head + _turns(row["chosen"], "chosen", where, answer_role)
    rejected = head + _turns(row["rejected"], "rejected", where, answer_role)
    for column, chat in (("chosen", chosen), ("rejected", rejected)):
        if len(chat) < 2 or chat[-1]["role"] != "assistant":
            raise CaiError(f"{where}: '{column}' must be a conversation of at least one user turn that ends with "
                           "the assistant's answer")
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (a, b) in enumerate(zip(chosen, rejected), 1) if a != b),
                    min(len(chosen), len(rejected)))
        raise CaiError(f"{where}: 'chosen' and 'rejected' must share every turn but the last assistant answer, "
                       f"and they differ at turn {turn}, so they are not two answers to one conversation")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _turns(value: Any, column: str, where: str, role: str | None = "user") -> Chat:
    """A cell as chat turns: a message list as it is; text as a transcript, or as one turn of ``role``.

    ``role`` None means the text must be an hh-rlhf transcript. A prompt written as a transcript
    ends with an empty ``Assistant:`` turn, where the answers go; that turn is dropped.
    """
    if isinstance(value, list):
        if not all(isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
                   for m in value):
            raise CaiError(f"{where}: '{column}' must be text or a list of {{role, content}} messages with roles "
                           f"{', '.join(_ROLES)}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if not isinstance(value, str):
        raise CaiError(f"{where}: '{column}' holds {type(value).__name__} {value!r:.40}; expected text or a list of messages")
    if role is None or (column == "prompt" and value.lstrip().startswith("Human:")):
        turns = parse_transcript(value)
        if not turns:
            raise CaiError(f"{where}: '{column}' is not an hh-rlhf transcript (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"); "
                           "put plain answers beside a 'prompt' column instead")
        if column == "prompt" and turns[-1] == {"role": "assistant", "content": ""}:
            turns = turns[:-1]
        return turns
    return [{"role": role, "content": value.strip()}]
