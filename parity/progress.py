"""The one progress bar: `with steps(enabled, total, title) as advance: advance("layer 3")`.

It draws on stderr only when asked for and stderr is a terminal, so pipes, CI logs and `--json -` stay clean;
otherwise `advance` does nothing. Every long job in the package (capture, replays, explainer) uses it."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def steps(enabled: bool, total: int, title: str) -> Iterator[Callable[[str], None]]:
    """One step per call of the yielded function; the bar shows the step being worked on and the time taken."""
    if not enabled or not sys.stderr.isatty():
        yield lambda step="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[step]}"), TimeElapsedColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(title, total=total, step="")
        started = [False]

        def advance(step: str = "") -> None:
            # The first call names the step being started; each later call also counts the previous one done.
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, step=step)

        yield advance
        bar.update(task, completed=total)
