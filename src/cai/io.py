"""Files that survive crashes: atomic writes and append-only JSONL with resumable reads.

Stages write one JSON row per finished item and flush it at once, so a killed run loses at most
the row in flight. A crash can leave a torn last line (no newline, half a JSON object): reading
repairs it by truncating the file back to the last complete line, then the rerun redoes that row.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai.errors import CaiError


def _os_error(path: Path, err: OSError, action: str) -> CaiError:
    if err.errno == errno.ENOSPC:
        return CaiError(f"no space left on the device while {action} {path}; free some space and rerun (finished rows are kept)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CaiError(f"permission denied while {action} {path}; choose a writable output folder")
    verb = {"creating": "create", "writing": "write", "opening": "open", "closing": "close"}.get(action, action)
    if err.errno == errno.ENOTDIR:
        blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), path)
        return CaiError(f"could not {verb} {path}: {blocker} is a file, not a folder; choose another output folder")
    return CaiError(f"could not {verb} {path}: {err.strerror or err}")


def ensure_dir(path: str | Path) -> Path:
    """Create a folder (and parents), with a clear error when that's not possible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise CaiError(f"{path} exists and is a file, not a folder") from e
    except OSError as e:
        raise _os_error(path, e, "creating") from e
    if not os.access(path, os.W_OK):
        raise CaiError(f"output folder {path} is not writable; choose another or fix its permissions")
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place (never half-written)."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _os_error(path, e, "writing") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file. With ``repair``, a torn last line (from a crash) is cut off the file.

    Raises:
        CaiError: a malformed line that isn't a torn tail, or a non-UTF-8 file.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    offset = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        end = offset + len(raw) + (0 if is_last else 1)
        if raw.strip():
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                torn = is_last or all(not x.strip() for x in lines[number:])
                if repair and torn:
                    with path.open("r+b") as f:
                        f.truncate(offset)
                    return rows
                raise CaiError(f"{path} line {number} is not valid JSON ({e}); fix or delete that line") from e
        offset = end
    if repair and data and not data.endswith(b"\n"):
        # A complete last row without its newline: add it so appends start on a new line.
        with path.open("ab") as f:
            f.write(b"\n")
    return rows


class JsonlWriter:
    """Append rows to a JSONL file, each flushed (and fsynced) as soon as it is written."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        ensure_dir(self.path.parent)
        if self.path.is_file():  # cut a torn last line left by a crash, or the next row would join it
            read_jsonl(self.path, repair=True)
        self.fsync = fsync
        try:
            self._f = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise _os_error(self.path, e, "opening") from e

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
        except OSError as e:
            raise _os_error(self.path, e, "writing") from e

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def close(self) -> None:
        # A write that failed (disk full) leaves its bytes buffered, and closing retries them.
        try:
            self._f.close()
        except OSError as e:
            raise _os_error(self.path, e, "closing") from e

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
