"""Progress display for long work (calibration, firmware builds, flashing, board runs).

Shown on stderr with rich only when stderr is a terminal and nobody asked for quiet (``--quiet``
sets ``QUIET``); otherwise every helper here is a no-op, so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = bool(quiet)


def enabled(quiet: bool = False) -> bool:
    return not (quiet or QUIET) and sys.stderr.isatty()


@contextmanager
def progress_bar(label: str, quiet: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A bar for work counted in steps: yields ``update(done, total)``, or None when quiet."""
    if not enabled(quiet):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)
    task = prog.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total)

    with prog:
        yield update


@contextmanager
def status(label: str, quiet: bool = False) -> Iterator[None]:
    """A spinner for work of unknown length (a firmware build, a flash, booting an emulator)."""
    if not enabled(quiet):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield
