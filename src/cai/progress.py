"""Progress bars for long steps: rows/s, tokens/s and an ETA, drawn on stderr by rich."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cai.backends.base import ProgressFn

stderr = Console(stderr=True)


def rate_text(rows: int, tokens: int, seconds: float) -> str:
    """``2.50 rows/s 812.3 tok/s``; work that counts no tokens (scoring pairs) shows no token rate, never 0.0."""
    return f"{rows / seconds:.2f} rows/s" + (f" {tokens / seconds:.1f} tok/s" if tokens else "")


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[ProgressFn]:
    """Yield a ``progress(rows, tokens)`` callback that advances a bar showing rows/s and tokens/s."""
    if not enabled:
        yield lambda rows, tokens: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")
        tokens_done = 0

        def advance(rows: int, tokens: int) -> None:
            nonlocal tokens_done
            tokens_done += tokens
            elapsed = bar.tasks[0].elapsed or 1e-9
            done = bar.tasks[0].completed + rows
            bar.update(task, advance=rows, rate=rate_text(done, tokens_done, elapsed))

        yield advance
