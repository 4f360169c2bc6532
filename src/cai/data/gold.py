"""Gold comparison pairs: the project's human labels.

Each pair, written for this project, is a conversation ending with a user turn, a *better*
answer (harmless and non-evasive: it engages, declines only the harmful part, says why and
offers a safe alternative; or, for helpfulness pairs, the correct and useful answer) and a
*worse* one of a recorded kind:

- ``harmful``: complies with the harmful request (written without any real operational detail);
- ``evasive``: a bare refusal or a lecture, often to a request that was fine to answer;
- ``unhelpful``: neither harmful nor a refusal, but useless (off-topic, vague, wrong);
- ``helpfulness``: a helpfulness prompt whose worse answer is wrong, sloppy or a needless refusal.

Which answer is better is known by construction, so no judge is needed to score a model on them
(`cai.eval.gold`), and a judge itself can be checked against them. The built-in file has 300
pairs (240 red-team over 16 harm categories, 60 helpfulness) with a fixed dev/test split; any
JSONL file of the same shape works.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from cai.errors import CaiError
from cai.io import read_jsonl
from cai.types import Chat

KINDS = ("harmful", "evasive", "unhelpful", "helpfulness")
SPLITS = ("dev", "test")
BUILTIN = "gold"
"""Name of the shipped file, accepted wherever a gold-pairs file is."""
GROUPS = ("all", *KINDS)
"""Rows of a summary over gold pairs: every pair, then each kind of worse answer."""


@dataclass(frozen=True)
class GoldPair:
    """One human-labelled comparison: ``better`` is preferred to ``worse`` for ``messages``."""

    id: str
    category: str
    kind: str
    split: str
    messages: Chat
    better: str
    worse: str

    @property
    def axis(self) -> str:
        """``helpfulness`` for helpfulness pairs, else ``harmlessness``."""
        return "helpfulness" if self.kind == "helpfulness" else "harmlessness"


def stratified(pairs: Sequence[GoldPair], limit: int | None) -> list[GoldPair]:
    """At most ``limit`` pairs, taken round-robin over kinds so a small limit still covers each."""
    if limit is None or limit >= len(pairs):
        return list(pairs)
    by_kind: dict[str, list[GoldPair]] = {}
    for p in pairs:
        by_kind.setdefault(p.kind, []).append(p)
    picked: list[GoldPair] = []
    while len(picked) < limit:
        for rows in by_kind.values():
            if rows and len(picked) < limit:
                picked.append(rows.pop(0))
    return picked


def builtin_gold_path() -> Path:
    return Path(str(files("cai.data").joinpath("gold_pairs.jsonl")))


def load_gold_pairs(source: str | Path = BUILTIN, split: str | None = "test") -> list[GoldPair]:
    """Read and check a gold-pairs file.

    Args:
        source: ``"gold"`` (the built-in file) or a JSONL path of rows ``{id, category, kind,
            split, messages, better, worse}``.
        split: keep only this split (``dev`` or ``test``); None keeps every row.

    Raises:
        CaiError: a missing file, or a row that breaks the schema (named by line and field).
    """
    path = builtin_gold_path() if str(source) == BUILTIN else Path(source)
    if not path.is_file():
        raise CaiError(f"gold pairs file {path} does not exist; give a JSONL file or 'gold' for the built-in pairs")
    if split is not None and split not in SPLITS:
        raise CaiError(f"gold pairs split '{split}' is unknown; use one of {', '.join(SPLITS)} (or null for all)")
    pairs, seen = [], set()
    for line, row in enumerate(read_jsonl(path), start=1):
        pair = _check_row(row, f"{path} line {line}")
        if pair.id in seen:
            raise CaiError(f"{path} line {line}: id '{pair.id}' appears twice")
        seen.add(pair.id)
        if split is None or pair.split == split:
            pairs.append(pair)
    if not pairs:
        raise CaiError(f"{path} has no gold pairs{f' in split {split}' if split else ''}")
    return pairs


def _check_row(row: Any, where: str) -> GoldPair:
    if not isinstance(row, dict):
        raise CaiError(f"{where}: a gold pair must be a JSON object")
    for key in ("id", "category", "kind", "split", "better", "worse"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise CaiError(f"{where}: '{key}' must be a non-empty string")
    if row["kind"] not in KINDS:
        raise CaiError(f"{where}: kind '{row['kind']}' is unknown; use one of {', '.join(KINDS)}")
    if row["split"] not in SPLITS:
        raise CaiError(f"{where}: split '{row['split']}' is unknown; use one of {', '.join(SPLITS)}")
    messages = row.get("messages")
    if (not isinstance(messages, list) or not messages
            or any(not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                   or not isinstance(m.get("content"), str) for m in messages)):
        raise CaiError(f"{where}: 'messages' must be a list of {{role, content}} chat messages")
    if messages[-1]["role"] != "user":
        raise CaiError(f"{where}: 'messages' must end with a user turn (the answers reply to it)")
    if row["better"].strip() == row["worse"].strip():
        raise CaiError(f"{where}: 'better' and 'worse' are the same text")
    return GoldPair(id=row["id"], category=row["category"], kind=row["kind"], split=row["split"],
                    messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                    better=row["better"], worse=row["worse"])
