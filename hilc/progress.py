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


class PartsProgress:
    """``update(done, total)`` for the whole job plus ``part(name, done, total=None, note="")``
    for each piece of it (a Ray shard count, a board of a farm)."""

    def __init__(self, prog, total_task) -> None:
        self.prog, self.total_task, self.parts = prog, total_task, {}

    def __call__(self, done: int, total: int) -> None:
        self.prog.update(self.total_task, completed=done, total=total)

    def part(self, name: str, done: int, total: int | None = None, note: str = "") -> None:
        if name not in self.parts:
            self.parts[name] = self.prog.add_task(f"  {name}", total=total)
        self.prog.update(self.parts[name], completed=done, total=total,
                         description=f"  {name}{(' ' + note) if note else ''}")


@contextmanager
def parts_progress(label: str, quiet: bool = False) -> Iterator[PartsProgress | None]:
    """A total bar with one line per part below it (distributed work); None when quiet."""
    if not enabled(quiet):
        yield None
        return
    import rich
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # inside another bar (a compile's, on rich's own console): nest below it on that console
    # (rich >= 14 stacks live displays), rather than a second display fighting over the terminal
    outer = rich.get_console()
    console = outer if getattr(outer, "_live_stack", None) else Console(stderr=True)
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)
    with prog:
        yield PartsProgress(prog, prog.add_task(label, total=None))
