"""Read raw records from wherever a prompt set lives, before any row is interpreted.

Sources: a built-in set, a local `.jsonl`/`.json`/`.csv`/`.parquet`/`.txt` file, a folder written
by `datasets` `save_to_disk`, or `hf:NAME[:SPLIT]` on the Hugging Face hub. Each reader returns
the records as plain dicts, each labelled with where it came from so that errors can point at it;
turning a record into a chat is `cai.data.loaders`' job.
"""

from __future__ import annotations

import csv
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from cai.errors import CaiError

BUILTIN_SETS = {"red-team": "red_team.jsonl", "helpfulness": "helpfulness.jsonl"}
_TRUE = ("1", "true", "yes", "on")

Raw = list[tuple[str, dict[str, Any]]]
"""Rows as read from a source, each with a 'where' label ("file.jsonl line 3") for error messages."""


def read_source(source: str | Path, split: str | None) -> tuple[str, Raw, str | None]:
    """Read every record of a prompt source, uninterpreted.

    Args:
        source: a built-in name, a local file or saved-dataset folder, or `hf:NAME[:SPLIT]`.
        split: for a DatasetDict or hub dataset, the split to load; ignored by plain files.

    Returns:
        (display name, raw rows, the split the source itself was loaded as, or None).

    Raises:
        CaiError: a missing or unreadable source, an unknown extension, or a hub failure.
    """
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
    readers = {
        ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CaiError(
            f"cannot read {path}: unknown extension {path.suffix or '(none)'!r}; use .jsonl, .json, .csv, "
            ".parquet, .txt, a folder saved with datasets' save_to_disk, or hf:NAME."
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


def _read_txt(path: Path, name: str) -> Raw:
    """One prompt per non-empty line; the line, stripped, becomes a plain `prompt` column."""
    # split on "\n" only, like JSONL: a prompt may hold U+2028 and friends that splitlines breaks on.
    lines = enumerate(_decode(path, name).split("\n"), 1)
    return [(f"{name} line {number}", {"prompt": line.strip()}) for number, line in lines if line.strip()]


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
