"""Split a generation stage's rows across machines (``--shard i/N``) and merge their outputs.

Every machine runs the same stage with the same config and its own ``--shard i/N``; each keeps
the rows whose id hashes to ``i`` (mod N), so the machines agree without talking to each other,
no row runs twice and none is left out. Seeds are derived from row ids (`stable_seed`), so a row
gives the same output whichever shard ran it. Afterwards `merge_shards` joins the shards' JSONL
files into the one file the next stage reads (``cai merge``, `cai.runs.merge_stage`, does this for
every data file of a stage and marks the stage done).

    cai critique -c run.yaml --shard 0/2      # machine A
    cai critique -c run.yaml --shard 1/2      # machine B
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, TypeVar

from cai.errors import CaiError
from cai.io import read_jsonl, write_text_atomic

T = TypeVar("T")

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` as ``(i, N)``; check it when the command line is read, before any model loads.

    Raises:
        CaiError: not two whole numbers ``i/N`` with ``0 <= i < N``.
    """
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise CaiError(f"--shard {spec!r} is not of the form i/N (for example 0/4: the first of four shards)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise CaiError(f"--shard {spec!r} is out of range: with N shards, i runs from 0 to N-1 (for example 0/{max(count, 1)})")
    return index, count


def row_id(row: Any) -> str:
    """A row's ``id``, whether the row is an object with ``.id`` or a dict with ``"id"``."""
    value = row.get("id") if isinstance(row, dict) else getattr(row, "id", None)
    if value is None:
        raise CaiError(f"a row has no id, so it can't be assigned to a shard: {str(row)[:80]}")
    return str(value)


def shard_of(id_: str, count: int) -> int:
    """Which of ``count`` shards the row ``id_`` belongs to: a hash every machine and Python agrees on.

    (Python's own ``hash`` of a string changes from process to process, so it can't be used here.)
    """
    digest = hashlib.sha256(id_.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_rows(rows: Iterable[T], shard: str | None) -> list[T]:
    """The rows that shard ``shard`` (``"i/N"``) runs, in their original order; all rows for None.

    Args:
        rows: prompt rows (with ``.id``) or JSONL rows (with ``"id"``).
        shard: ``"i/N"`` with ``0 <= i < N``, or None for no sharding.

    Returns:
        The rows whose id hashes to shard ``i``. Over ``i = 0..N-1`` the shards are disjoint and
        together hold every row.

    Raises:
        CaiError: a malformed ``shard``, or a row without an id.
    """
    if shard is None:
        return list(rows)
    index, count = parse_shard(shard)
    return [row for row in rows if shard_of(row_id(row), count) == index]


def merge_shards(paths: list[Path], out: Path) -> int:
    """Join shard JSONL files into ``out``, each id once (the first copy wins); returns the row count.

    A torn last line in a shard (a machine killed mid-write) is cut off that shard's file, as on a
    resume; rerunning that shard redoes the row. ``out`` is written atomically, so it may also be
    one of ``paths``.

    Raises:
        CaiError: a shard file is missing or has a malformed line, or a row has no id.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in map(Path, paths):
        if not path.is_file():
            raise CaiError(f"shard file {path} does not exist; run that shard first or leave it out of the merge")
        for row in read_jsonl(path, repair=True):
            if not isinstance(row, dict) or row.get("id") is None:
                raise CaiError(f"{path} holds a row without an id, so shards can't be merged: {str(row)[:80]}")
            key = str(row["id"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)
