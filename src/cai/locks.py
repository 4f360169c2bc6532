"""One writer per stage folder: an exclusive lock a stage holds while it runs.

Two processes on one stage folder (a second terminal, a scheduler that requeues a job whose first
copy is still alive) would both append to the same JSONL files and both train into one model
folder. So a stage takes an exclusive lock before it looks at its folder and keeps it until it is
done; a second process stops at once with a sentence naming the holder.

The lock is `filelock`'s ``FileLock``: ``flock(2)`` on a file beside the folder
(``runs/demo/.critique.lock`` for ``runs/demo/critique/``; a shard's sits beside the shard's folder,
so shards of one stage run side by side). The kernel drops a ``flock`` when its holder exits in any
way, ``kill -9`` included, so a killed run never blocks its rerun. Who holds it (pid, host, since
when, command) is written to a JSON file beside the lock, because every contender truncates the
lock file itself when it opens it.

On a network file system the lock holds across machines only where the file system carries
``flock`` between clients (NFSv4 and Lustre mounted with ``flock`` do); where ``flock`` is missing,
filelock falls back to a marker file with the holder's pid and host, which it breaks when that pid
is gone on the same host; a marker left by a machine that died must be deleted by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from cai.errors import CaiError
from cai.io import ensure_dir, write_json_atomic

_HELD: dict[Path, FileLock] = {}
"""The folders this process holds, so a stage can take its lock twice (re-entrant) and give it back once."""


def lock_path(folder: Path) -> Path:
    """The lock file of a stage (or shard) folder: a hidden file beside it, not inside it."""
    return folder.parent / f".{folder.name}.lock"


def holder_path(folder: Path) -> Path:
    """The JSON file that says who holds the lock of ``folder``."""
    return folder.parent / f".{folder.name}.lock.holder.json"


def describe_holder(folder: Path) -> str:
    """``pid 123 on host-a since 2026-12-07 10:31:02 (cai critique -c demo.yaml)``, or a vaguer phrase."""
    try:
        holder = json.loads(holder_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another process"
    command = str(holder.get("command") or "")
    command = f" ({command[:77] + '...' if len(command) > 80 else command})" if command else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}{command}"


def acquire_folder(folder: Path, what: str) -> None:
    """Take the exclusive lock of a stage (or shard) folder for this process, or stop.

    Taking a lock this process already holds is a no-op, so nested callers need no bookkeeping, and
    a stage that failed in a notebook can be run again in the same process.

    Args:
        folder: the stage or shard folder the caller is about to read and write.
        what: the stage's name, the first word of the error sentence.

    Raises:
        CaiError: another process holds the lock (naming it), or the file system refuses locks.
    """
    folder = Path(folder).absolute()
    if folder in _HELD:
        return
    path = lock_path(folder)
    ensure_dir(path.parent)
    lock = FileLock(path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise CaiError(f"{what}: {folder} is being written by another cai process, {describe_holder(folder)}; "
                       "wait for it to finish, or stop it and run this again (its finished rows are kept)") from None
    except (OSError, NotImplementedError) as err:
        reason = getattr(err, "strerror", None) or err
        raise CaiError(f"{what}: cannot lock {path} ({reason}); put the run folder on a file system "
                       "that allows file locks (runs_dir=...)") from None
    _HELD[folder] = lock
    write_json_atomic(holder_path(folder), {
        "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["cai", *sys.argv[1:]]) if Path(sys.argv[0]).name == "cai" else " ".join(sys.argv)})


def release_folder(folder: Path) -> None:
    """Give back the lock of ``folder`` if this process holds it (and remove the holder note)."""
    folder = Path(folder).absolute()
    lock = _HELD.pop(folder, None)
    if lock is None:
        return
    holder_path(folder).unlink(missing_ok=True)  # before the release: a new holder's note must not be deleted
    lock.release(force=True)


def release_all() -> None:
    """Give back every lock this process holds (after a stage, finished or failed)."""
    for folder in list(_HELD):
        release_folder(folder)


def held_folders() -> list[Path]:
    """The folders whose locks this process holds now."""
    return list(_HELD)
