"""Load prompt sets into typed rows, whatever shape they arrive in.

Sources (read by `cai.data.sources`): a built-in set (`red-team`, `helpfulness`), a local
`.jsonl`/`.json`/`.csv`/`.parquet`/`.txt` file (`.txt`: one prompt per non-empty line), a folder
written by `datasets` `save_to_disk`, or `hf:NAME[:SPLIT]` on the Hugging Face hub.
Row shapes, detected per row: a chat `messages` list; a plain prompt column (`prompt`, `text`,
`question`, `instruction`); hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") in
`chosen`/`rejected`, `transcript` or `text`; and TRL's conversational `prompt` (a messages list).
Every shape ends as a `PromptRow` whose messages end with the user turn a model should answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import takewhile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cai.data.sources import Raw, read_source
from cai.errors import CaiError
from cai.types import Chat

if TYPE_CHECKING:
    from rich.console import Console

ROW_FORMATS = ("messages", "prompt", "hh-rlhf")
"""Values for `fmt`: force a chat list, a plain-text prompt column, or a Human:/Assistant: transcript."""

# Where each row format looks for its prompt, in order of preference.
_COLUMNS_BY_FORMAT: dict[str | None, tuple[str, ...]] = {
    None: ("messages", "prompt", "chosen", "transcript", "text", "question", "instruction"),
    "messages": ("messages", "prompt"),
    "prompt": ("prompt", "text", "question", "instruction"),
    "hh-rlhf": ("chosen", "transcript", "text", "prompt"),
}
_MAPPABLE = ("prompt", "messages", "chosen", "rejected", "transcript", "id", "category", "split")
_ROLES = ("system", "user", "assistant")
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


@dataclass(frozen=True)
class PromptRow:
    """One prompt for the generation stages; `messages` always ends with a user turn."""

    id: str
    messages: Chat
    category: str = ""
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def last_user(self) -> str:
        """The text of the final user turn, the one a model is asked to answer."""
        return self.messages[-1]["content"]


@dataclass
class LoadReport:
    """What happened to the rows of one source on their way to `PromptRow`s."""

    source: str
    read: int = 0
    kept: int = 0
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    truncated: int = 0
    dropped_too_long: int = 0

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"{self.source}: read {self.read} rows, kept {self.kept} (dropped {self.dropped_empty} empty, "
            f"{self.dropped_duplicate} duplicate, {self.dropped_too_long} too long; truncated {self.truncated})"
        )


def load_prompts(
    source: str | Path,
    *,
    split: str | None = None,
    categories: list[str] | None = None,
    limit: int | None = None,
    column_map: dict[str, str] | None = None,
    fmt: str | None = None,
) -> tuple[list[PromptRow], LoadReport]:
    """Read a prompt set and return its rows, de-duplicated and filtered, with a report.

    Args:
        source: a built-in name (built-ins win over a same-named path; write `./red-team` for the
            path), a local file or saved-dataset folder, or `hf:NAME[:SPLIT]`. A `.txt` file holds
            one prompt per non-empty line, each read as a single user turn.
        split: keep rows of this split; for a DatasetDict or hub dataset, the split to load.
        categories: keep rows whose category is one of these.
        limit: stop after this many kept rows.
        column_map: canonical name -> your column, e.g. `{"prompt": "my_col", "id": "my_id"}`.
            Keys: prompt, messages, chosen, rejected, transcript, id, category, split.
        fmt: force a row format from `ROW_FORMATS` instead of detecting it per row.

    Rows without an id get the first 12 hex chars of the sha1 of their canonical messages JSON.
    Trailing assistant turns are removed so each prompt ends with its last user turn.

    Raises:
        CaiError: for any mistake in the source or the arguments, and when no rows are left.
    """
    if fmt not in (None, *ROW_FORMATS):
        raise CaiError(f"unknown fmt {fmt!r}; use one of {', '.join(ROW_FORMATS)} or leave it unset.")
    if limit is not None and limit < 1:
        raise CaiError(f"limit must be at least 1, got {limit}.")
    name, raw, source_split = read_source(source, split)
    column_map = dict(column_map or {})
    _check_column_map(column_map, raw, name)

    report = LoadReport(source=name, read=len(raw))
    rows: list[PromptRow] = []
    seen_chats: set[str] = set()
    seen_ids: set[str] = set()
    splits_seen: set[str] = set()
    categories_seen: set[str] = set()
    for where, original in raw:
        row = _apply_column_map(original, column_map)
        chat, used = _row_to_chat(row, where, fmt, tuple(column_map))
        row_split = str(row.get("split") or source_split or "train")
        category = str(row.get("category") or "")
        splits_seen.add(row_split)
        categories_seen.add(category)
        if (split is not None and row_split != split) or (categories is not None and category not in categories):
            continue
        # The prompt ends at the last user turn: any answer after it is what we will regenerate.
        last_user = max((i for i, m in enumerate(chat) if m["role"] == "user"), default=-1)
        chat = chat[: last_user + 1]
        if not chat or not chat[-1]["content"].strip():
            report.dropped_empty += 1
            continue
        canonical = json.dumps(chat, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        if canonical in seen_chats:
            report.dropped_duplicate += 1
            continue
        seen_chats.add(canonical)
        given_id = row.get("id")
        row_id = str(given_id) if given_id not in (None, "") else hashlib.sha1(canonical.encode()).hexdigest()[:12]
        if row_id in seen_ids:
            # Runs resume by id, so two different prompts sharing one would make one of them vanish.
            raise CaiError(f"{where} reuses id {row_id!r} for a different prompt; give every row a unique id.")
        seen_ids.add(row_id)
        meta = {k: v for k, v in row.items() if k not in used and k not in ("id", "category", "split")}
        rows.append(PromptRow(row_id, chat, category, row_split, meta))
        if limit is not None and len(rows) >= limit:
            break

    report.kept = len(rows)
    if not rows:
        raise CaiError(_nothing_left(report, split, categories, splits_seen, categories_seen))
    return rows, report


def fit_to_context(
    rows: Iterable[PromptRow],
    count_tokens: Callable[[Chat], int],
    max_tokens: int,
    policy: Literal["truncate_left", "drop"] = "truncate_left",
    report: LoadReport | None = None,
) -> list[PromptRow]:
    """Make every prompt fit in `max_tokens`, as measured by `count_tokens`.

    Policies:
        drop: a prompt longer than `max_tokens` is removed.
        truncate_left: the oldest turns are removed, one user turn and the replies after it at a
            time, until the prompt fits. Leading system messages are always kept (they set the
            behaviour) and so is the last user turn (it is the question). If those alone are still
            too long the row is dropped. A truncated row keeps its id and records the number of
            removed messages in `meta["turns_dropped"]`.

    Rows that already fit are returned unchanged, in their original order. With `report`, the
    truncated and dropped counts are added to it and `kept` is lowered by the drops.

    Raises:
        CaiError: for a bad policy or max_tokens, or when every row was too long.
    """
    if policy not in ("truncate_left", "drop"):
        raise CaiError(f"unknown context policy {policy!r}; use 'truncate_left' or 'drop'.")
    if max_tokens < 1:
        raise CaiError(f"max_tokens must be at least 1, got {max_tokens}.")
    fitted: list[PromptRow] = []
    seen = truncated = dropped = 0
    for row in rows:
        seen += 1
        if count_tokens(row.messages) <= max_tokens:
            fitted.append(row)
            continue
        shorter = _truncate_left(row.messages, count_tokens, max_tokens) if policy == "truncate_left" else None
        if shorter is None:
            dropped += 1
            continue
        truncated += 1
        meta = {**row.meta, "turns_dropped": len(row.messages) - len(shorter)}
        fitted.append(replace(row, messages=shorter, meta=meta))
    if report is not None:
        report.truncated += truncated
        report.dropped_too_long += dropped
        report.kept -= dropped
    if seen and not fitted:
        name = report.source if report is not None else "the prompt set"
        raise CaiError(
            f"no prompts left in {name} after fitting to max_tokens={max_tokens}: all {seen} were too long; "
            "raise max_tokens or use shorter prompts."
        )
    return fitted


def show_prompts(source: str | Path, console: Console, n: int = 3, **load_options: Any) -> LoadReport:
    """Print counts by category and split, then the first `n` rows (for `cai data show SOURCE`).

    `load_options` are passed to `load_prompts` (split, categories, limit, column_map, fmt).
    """
    from rich.table import Table
    from rich.text import Text  # plain Text, so brackets in prompts are not read as rich markup

    rows, report = load_prompts(source, **load_options)
    splits = sorted({r.split for r in rows})
    counts = Counter((r.category or "(none)", r.split) for r in rows)
    table = Table(title=f"{report.source}: {len(rows)} prompts")
    table.add_column("category")
    for name in splits:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for category in sorted({c for c, _ in counts}):
        per_split = [counts[(category, s)] for s in splits]
        table.add_row(Text(category), *(str(c) for c in per_split), str(sum(per_split)))
    console.print(table)
    for row in rows[:n]:
        console.print(Text(f"{row.id}  ({row.category or '-'}, {row.split})", style="bold"))
        for message in row.messages:
            content = " ".join(message["content"].split())
            content = content if len(content) <= 300 else content[:299] + "…"
            console.print(Text(f"  {message['role']}: {content}"))
    console.print(Text(report.summary(), style="dim"))
    return report


# ---- turning a row into a chat ---------------------------------------------------------------


def _check_column_map(column_map: dict[str, str], raw: Raw, name: str) -> None:
    columns = {k for _, r in raw for k in r}
    for key, column in column_map.items():
        if key not in _MAPPABLE:
            raise CaiError(f"column_map key {key!r} is not one of {', '.join(_MAPPABLE)}.")
        if raw and column not in columns:
            found = ", ".join(sorted(columns))
            raise CaiError(f"column_map maps {key!r} to column {column!r}, but {name} has only columns {found}.")


def _apply_column_map(row: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    if not column_map:
        return row
    sources = set(column_map.values())
    # A mapped column is consumed under its new name, so it is not detected twice or kept in meta.
    mapped = {k: v for k, v in row.items() if k not in sources}
    mapped.update({key: row.get(column) for key, column in column_map.items()})
    return mapped


def _row_to_chat(
    row: dict[str, Any], where: str, fmt: str | None, mapped_first: tuple[str, ...]
) -> tuple[Chat, set[str]]:
    """Find the prompt in `row`; return its chat and the columns that made it."""
    order = sorted(_COLUMNS_BY_FORMAT[fmt], key=lambda k: k not in mapped_first)  # named columns first
    present = [k for k in order if k in row]
    for key in present:
        if row[key] in (None, ""):  # a null cell: fall through to the next candidate column
            continue
        if key == "chosen":
            if row.get("rejected") in (None, ""):
                continue
            chosen = _value_to_chat(row["chosen"], "chosen", where, fmt)
            rejected = _value_to_chat(row["rejected"], "rejected", where, fmt)
            # The turns both answers share are the prompt the comparison was made on.
            shared = [a for a, b in takewhile(lambda pair: pair[0] == pair[1], zip(chosen, rejected))]
            return shared, {"chosen", "rejected"}
        chat = _value_to_chat(row[key], key, where, fmt)
        if key == "instruction" and isinstance(row.get("input"), str) and row["input"].strip() and chat:
            chat = [{"role": "user", "content": f"{chat[0]['content']}\n\n{row['input']}"}]  # Alpaca style
            return chat, {"instruction", "input"}
        return chat, {key}
    if present:
        return [], set(present)  # every candidate column is null: an empty prompt, counted as such
    hint = f" or drop fmt={fmt!r}" if fmt else ""
    raise CaiError(
        f"{where} has no recognisable prompt (columns: {', '.join(map(str, row)) or 'none'}); name the prompt "
        f"column with column_map={{'prompt': 'your_column'}}{hint}."
    )


def _value_to_chat(value: Any, key: str, where: str, fmt: str | None) -> Chat:
    if isinstance(value, str) and key == "messages":  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise CaiError(f"{where}: column 'messages' is text that is not a JSON list of messages.") from None
    if isinstance(value, list):
        if fmt == "prompt":
            raise CaiError(f"{where}: column {key!r} holds a list, not text, so use fmt='messages' instead of 'prompt'.")
        return _check_messages(value, key, where)
    if not isinstance(value, str):
        raise CaiError(f"{where}: column {key!r} holds a {type(value).__name__}; expected text or a list of messages.")
    is_transcript = value.lstrip().startswith("Human:")
    if fmt == "hh-rlhf" or (fmt is None and is_transcript):
        if not is_transcript:
            raise CaiError(f"{where}: column {key!r} is not a Human:/Assistant: transcript, so drop fmt='hh-rlhf'.")
        return parse_transcript(value)
    if fmt == "messages":
        raise CaiError(f"{where}: column {key!r} holds text, not a list of messages, but fmt='messages' was forced.")
    return [{"role": "user", "content": value}]


def _check_messages(value: list[Any], key: str, where: str) -> Chat:
    chat: Chat = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise CaiError(f"{where}: {key}[{i}] needs a role of {', '.join(_ROLES)}, got {message!r:.80}.")
        content = message.get("content")
        if isinstance(content, list):  # multimodal parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            content = "" if content is None else str(content)
        chat.append({"role": message["role"], "content": content})
    return chat


def parse_transcript(text: str) -> Chat:
    """Split an hh-rlhf transcript into chat messages.

    Args:
        text: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; text before the first speaker is dropped.

    Returns:
        The messages in order (``Human`` is ``user``), with consecutive turns of one speaker merged
        into one message (joined by a blank line) and each turn's text stripped.
    """
    parts = _TURN.split(text.lstrip())
    chat: Chat = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if chat and chat[-1]["role"] == role:
            chat[-1]["content"] = f"{chat[-1]['content']}\n\n{content.strip()}"
        else:
            chat.append({"role": role, "content": content.strip()})
    return chat


def _truncate_left(chat: Chat, count_tokens: Callable[[Chat], int], max_tokens: int) -> Chat | None:
    n_system = next((i for i, m in enumerate(chat) if m["role"] != "system"), len(chat))
    head, body = chat[:n_system], chat[n_system:]
    while len(body) > 1:
        body = body[1:]
        while len(body) > 1 and body[0]["role"] != "user":  # start again on a user turn
            body = body[1:]
        if count_tokens(head + body) <= max_tokens:
            return head + body
    return None


def _nothing_left(report: LoadReport, split: str | None, categories: list[str] | None,
                  splits: set[str], cats: set[str]) -> str:
    filters = [f"split={split!r}"] if split is not None else []
    filters += [f"categories={categories!r}"] if categories is not None else []
    present = ", ".join(sorted(c or "(none)" for c in cats))
    return (
        f"no prompts left in {report.source} after {' and '.join(filters) or 'dropping empty and duplicate rows'} "
        f"(read {report.read} rows, {report.dropped_empty} empty, {report.dropped_duplicate} duplicate; "
        f"splits present: {', '.join(sorted(splits)) or 'none'}; categories present: {present or 'none'})."
    )
