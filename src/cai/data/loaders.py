"""Load prompt sets into typed rows, whatever shape they arrive in.

Sources: a built-in set (`red-team`, `helpfulness`), a local `.jsonl`/`.json`/`.csv`/`.parquet`
file, a folder written by `datasets` `save_to_disk`, or `hf:NAME[:SPLIT]` on the Hugging Face hub.
Row shapes, detected per row: a chat `messages` list; a plain prompt column (`prompt`, `text`,
`question`, `instruction`); hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") in
`chosen`/`rejected`, `transcript` or `text`; and TRL's conversational `prompt` (a messages list).
Every shape ends as a `PromptRow` whose messages end with the user turn a model should answer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import takewhile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cai.errors import CaiError
from cai.types import Chat

if TYPE_CHECKING:
    from rich.console import Console

BUILTIN_SETS = {"red-team": "red_team.jsonl", "helpfulness": "helpfulness.jsonl"}
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
_TRUE = ("1", "true", "yes", "on")

Raw = list[tuple[str, dict[str, Any]]]
"""Rows as read from a source, each with a 'where' label ("file.jsonl line 3") for error messages."""


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
            path), a local file or saved-dataset folder, or `hf:NAME[:SPLIT]`.
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
    name, raw, source_split = _read_source(source, split)
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


# ---- reading sources -------------------------------------------------------------------------


def _read_source(source: str | Path, split: str | None) -> tuple[str, Raw, str | None]:
    """Return (display name, raw rows, split the source itself was loaded as or None)."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hub(source[3:], split)
    if isinstance(source, str) and source in BUILTIN_SETS:
        ref = resources.files("cai.data") / BUILTIN_SETS[source]
        if not ref.is_file():
            missing = f"cai/data/{BUILTIN_SETS[source]}"
            raise CaiError(f"built-in prompt set {source!r} is not in this install (no {missing}); reinstall cai.")
        with resources.as_file(ref) as path:
            return source, _jsonl_rows(_decode(path, source), source), None
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and not path.suffix and len(path.parts) == 1:
            raise CaiError(
                f"unknown prompt set {source!r}: it is not a file or folder, and the built-in sets are "
                f"{', '.join(BUILTIN_SETS)} (use hf:NAME for a Hugging Face dataset)."
            )
        raise CaiError(f"prompt file {path} does not exist; check the path.")
    if path.is_dir():
        rows, loaded_split = _read_saved_dataset(path, split)
        return str(path), rows, loaded_split
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CaiError(
            f"cannot read {path}: unknown extension {path.suffix or '(none)'!r}; use .jsonl, .json, .csv, "
            ".parquet, a folder saved with datasets' save_to_disk, or hf:NAME."
        )
    return str(path), reader(path, str(path)), None


def _decode(path: Path, name: str) -> str:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # Excel and Notepad like to add a BOM
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        bad = f"byte 0x{data[err.start]:02x} on line {line}"
        raise CaiError(f"{name} is not UTF-8 text ({bad}); re-save it as UTF-8.") from None


def _jsonl_rows(text: str, name: str) -> Raw:
    rows: Raw = []
    # split on "\n" only: str.splitlines would also break on U+2028, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"{err.msg} at column {err.colno}"
            raise CaiError(f"{name} line {number} is not valid JSON ({problem}); fix or remove that line.") from None
        if not isinstance(obj, dict):
            kind = type(obj).__name__
            raise CaiError(f"{name} line {number} is a JSON {kind}, not an object; write one row object per line.")
        rows.append((f"{name} line {number}", obj))
    return rows


def _read_jsonl(path: Path, name: str) -> Raw:
    return _jsonl_rows(_decode(path, name), name)


def _read_json(path: Path, name: str) -> Raw:
    text = _decode(path, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # datasets' to_json writes JSON Lines into .json files by default
            return _jsonl_rows(text, name)
        raise CaiError(f"{name} is not valid JSON ({err.msg} on line {err.lineno}); fix the file.") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise CaiError(f"{name} must hold a JSON list of row objects (or one object with a single such list).")
    return [(f"{name} row {i}", r) for i, r in enumerate(data, 1)]


def _read_csv(path: Path, name: str) -> Raw:
    reader = csv.DictReader(io.StringIO(_decode(path, name), newline=""))
    try:
        # rows longer than the header put their extras under the key None; they have no column name.
        return [(f"{name} row {i}", {k: v for k, v in r.items() if k is not None}) for i, r in enumerate(reader, 1)]
    except csv.Error as err:
        raise CaiError(f"{name} is not valid CSV near line {reader.line_num} ({err}); fix the quoting there.") from None


def _read_parquet(path: Path, name: str) -> Raw:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise CaiError(f"{name} is not a readable Parquet file ({err}).") from None
    return [(f"{name} row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]


def _read_saved_dataset(path: Path, split: str | None) -> tuple[Raw, str | None]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise CaiError(f"{path} is a folder but not one saved with datasets' save_to_disk; pass a file or such a folder.")
    import datasets

    return _dataset_rows(datasets.load_from_disk(str(path)), str(path), split)


def _dataset_rows(ds: Any, name: str, split: str | None) -> tuple[Raw, str | None]:
    """Rows of a `datasets.Dataset`, or of one split of a `DatasetDict` (`split`, else train)."""
    loaded_split = None
    if hasattr(ds, "keys"):  # a DatasetDict
        names = list(ds.keys())
        loaded_split = split or ("train" if "train" in names or len(names) != 1 else names[0])
        if loaded_split not in names:
            raise CaiError(f"{name} has no split {loaded_split!r}; pass split= one of {', '.join(names)}.")
        ds = ds[loaded_split]
    return [(f"{name} row {i}", r) for i, r in enumerate(ds.to_list(), 1)], loaded_split


def _read_hub(spec: str, split: str | None) -> tuple[str, Raw, str | None]:
    name, _, hub_split = spec.partition(":")
    if not name:
        raise CaiError("hf: needs a dataset name after it, like hf:Anthropic/hh-rlhf:test.")
    if hub_split and split and hub_split != split:
        raise CaiError(f"hf:{spec} names split {hub_split!r} but split={split!r} was also given; keep only one.")
    chosen = hub_split or split or "train"
    # Checked here, not left to datasets: its hub client reads these variables only once, at import.
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in _TRUE]
    if offline:
        raise CaiError(
            f"cannot fetch Hugging Face dataset {name!r}: {offline[0]} is set (offline mode); "
            "unset it, or save the dataset locally and pass that path."
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, split=chosen)
    except Exception as err:  # network, unknown name, gated repo, bad split: all fixable by the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaiError(
            f"could not load Hugging Face dataset {name!r} split {chosen!r} ({reason}); "
            "check the name, the split and your network."
        ) from None
    rows, _ = _dataset_rows(ds, f"hf:{name}:{chosen}", chosen)
    return f"hf:{name}:{chosen}", rows, chosen


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
        return _parse_transcript(value)
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


def _parse_transcript(text: str) -> Chat:
    """Split "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages, merging repeated speakers."""
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
