"""Terminal output: consoles, progress that also works in batch jobs, tables that are not cut."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from htcli.cli.messages import current_cli_words

console = Console(soft_wrap=True)  # results, on stdout
err = Console(stderr=True, soft_wrap=True)  # progress, notes and warnings, on stderr

PLAIN_EVERY_S = 10.0  # a plain progress line at most this often (plus the first and the last)


class Steps:
    """Progress of a long command: a rich bar on a terminal; otherwise (output redirected to a
    file, a batch job) plain lines `label: 12/40 (30%) art deco, 1m05s`, throttled."""

    def __init__(self, label: str, total: int | None = None, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.completed, self.description = 0, ""
        self._bar: Progress | None = None
        self._started = self._printed = time.perf_counter()
        self._shown: tuple | None = None  # (completed, description) of the last plain line

    def __enter__(self) -> Self:
        if self.enabled and err.is_terminal:
            self._bar = Progress(TextColumn(f"[bold]{self.label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"), console=err)
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total, completed=self.completed)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None and self.completed and self._shown != (self.completed, self.description):
            self._line(force=True)  # the final state, unless its line is already out

    def update(self, completed: int | None = None, total: int | None = None, description: str | None = None) -> None:
        self.completed = self.completed if completed is None else completed
        self.total = self.total if total is None else total
        self.description = self.description if description is None else description
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, total=self.total, description=self.description)
        elif self.enabled:
            self._line()

    def _line(self, force: bool = False) -> None:
        now = time.perf_counter()
        done = self.total is not None and self.completed >= self.total
        if not (force or done or self.completed <= 1 or now - self._printed >= PLAIN_EVERY_S):
            return
        self._printed, self._shown = now, (self.completed, self.description)
        of = f"/{self.total} ({self.completed / self.total:.0%})" if self.total else ""
        elapsed = int(now - self._started)
        parts = [f"{self.label}: {self.completed}{of}", self.description.strip(), f"[{elapsed // 60}m{elapsed % 60:02d}s]"]
        print(" ".join(part for part in parts if part), file=sys.stderr, flush=True)


@contextmanager
def steps(label: str, total: int | None = None, enabled: bool = True) -> Iterator[Steps]:
    with Steps(label, total, enabled) as progress:
        yield progress


def print_table(table: Table, to: Console = console) -> None:
    """Print a table at its natural width when the output is not a terminal (files, pipes): no
    cell is cut, and the title has room for its own line."""
    if to.is_terminal:
        to.print(table)
    else:
        wide = Console(file=to.file, width=100_000)
        natural = Measurement.get(wide, wide.options, table).maximum
        title = Text.from_markup(table.title).cell_len if isinstance(table.title, str) else 0
        width = max(natural, title)
        saved, table.min_width = table.min_width, width  # a title wraps at the table's width, not the console's
        try:
            Console(file=to.file, width=max(width, 20)).print(table)
        finally:
            table.min_width = saved


def warn(text: str) -> None:
    err.print(f"[yellow]warning:[/] {current_cli_words(text)}")


def note(text: str) -> None:
    err.print(f"[yellow]note:[/] {current_cli_words(text)}")
