"""What a running lineage shows its watchers: Prefect artifacts on its flow run and the CLI's progress bars.

Each lineage flow run gets a progress artifact (generations done, and the running fit's epochs in between) and a
table artifact (its per-generation metrics, one new version per generation or batch of cheap ones); the study's
run gets its summary as a markdown artifact. In the same process, :func:`watch` registers a listener (the
``madloop run`` progress bars, :func:`terminal_bars`) that sees every :class:`Progress` report. Reports cost
nothing when no one listens, and the progress artifact is updated at most every ``UPDATE_SECONDS`` (epochs of a
small fit take milliseconds).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

UPDATE_SECONDS = 2.0


@dataclass(frozen=True)
class Progress:
    """Lineage ``lineage`` of ``study`` is at generation ``generation`` (0-based) of ``generations``; its fit has run
    ``epoch`` of ``epochs`` epochs (0 of 0 when the estimator does not report epochs); ``finished``: the generation
    is done."""

    study: str
    lineage: str
    generation: int
    generations: int
    epoch: int = 0
    epochs: int = 0
    finished: bool = False

    @property
    def fraction(self) -> float:
        within = 1.0 if self.finished else (self.epoch / self.epochs if self.epochs else 0.0)
        return min(1.0, (self.generation + within) / max(self.generations, 1))


Listener = Callable[[Progress], None]
_listeners: list[Listener] = []


@contextmanager
def watch(listener: Listener) -> Iterator[None]:
    """Send every report made in this process to ``listener`` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(progress: Progress) -> None:
    for listener in list(_listeners):
        listener(progress)


def duration(seconds: float) -> str:
    """A duration as a person reads it: ``280 s``, ``2.1 s``, ``72 ms``, ``0.33 ms``."""
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2g} ms"


def generation_line(lineage: str, first: int, last: int, generations: int, scores: str, fit_seconds: float) -> str:
    """The log line of a finished generation, or of a batch of cheap ones (recorded together): the scores and fit
    time are the last one's."""
    which = f"generation {last} (of 0-{generations - 1})" if first == last else \
        f"generations {first}-{last} (of 0-{generations - 1}; recorded as one batch), the last"
    return f"[{lineage}] {which}: {scores}  fit {duration(fit_seconds)}"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from names such as ``default``, ``mle-s0``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def table_rows(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: the given columns, numbers rounded to 4 significant digits, undefined
    values (NaN) as empty cells."""
    def cell(value):
        if isinstance(value, float):
            return None if math.isnan(value) else float(f"{value:.4g}")
        return value

    return [{c: cell(row.get(c)) for c in columns} for row in rows]


class LineageWatch:
    """A lineage flow run's artifacts (progress, per-generation table) and its reports to in-process listeners."""

    def __init__(self, study: str, lineage: str, generations: int, columns: list[str], start: int = 0):
        from prefect.artifacts import create_progress_artifact

        self.study, self.lineage, self.generations, self.columns = study, lineage, generations, columns
        self.key = artifact_key(study, lineage)
        self.last_update = time.monotonic()
        self.sent = 100.0 * start / max(generations, 1)
        self.progress_id = create_progress_artifact(
            self.sent, description=f"{study}/{lineage}: generations done of {generations} (and the running fit's "
                                   "epochs)")
        report(Progress(study, lineage, start, generations, finished=False))

    def update(self, progress: Progress, force: bool = False) -> None:
        report(progress)
        now = time.monotonic()
        percent = round(100.0 * progress.fraction, 1)
        if percent != self.sent and (force or now - self.last_update >= UPDATE_SECONDS):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.progress_id, percent)
            self.sent, self.last_update = percent, now

    def epoch_callback(self, k: int) -> Callable[[int, int], None]:
        """The ``progress(done, total)`` an estimator calls once per epoch, for generation k's fit."""
        return lambda done, total: self.update(Progress(self.study, self.lineage, k, self.generations, done, total))

    def generation_done(self, k: int) -> None:
        self.update(Progress(self.study, self.lineage, k, self.generations, finished=True),
                    force=k == self.generations - 1)

    def table(self, rows: list[dict[str, Any]]) -> None:
        """The lineage's per-generation metrics as a table artifact (a new version of the same key each time)."""
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table_rows(rows, ["generation", *self.columns]), key=self.key,
                              description=f"{self.study}/{self.lineage}: metrics per generation "
                                          f"({len(rows)} of {self.generations} done; generation 0 trains on the real "
                                          "data)")


def study_summary_artifact(study: str, markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=artifact_key(study, "summary"), description=f"study {study}: summary")


# --- the terminal ----------------------------------------------------------------------------------------------


@contextmanager
def terminal_bars(enabled: bool = True) -> Iterator[None]:
    """A bar per lineage (generations, and the running fit's epochs) at the bottom of the terminal while the block
    runs, when stderr is one. One console draws everything: the log lines of every logger that writes to the
    terminal (Prefect's, MLflow's, warnings) and anything printed go above the bars, never into them."""
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    handlers = terminal_handlers(terminal)
    # Prefect's log lines keep their colours: the console is made with its handler's highlighter and styles
    styled = next((h.console for h in handlers if getattr(h, "console", None) is not None), None)
    console = Console(stderr=True, highlighter=getattr(styled, "highlighter", None), theme=prefect_log_styles(),
                      markup=False)  # "[mle] generation 3": text, not a markup tag
    if not enabled or not console.is_terminal:
        yield
        return
    bars = Bars(TextColumn("{task.description}", markup=False), BarColumn(bar_width=24),
                TextColumn("{task.fields[where]}", markup=False), TimeElapsedColumn(), console=console,
                redirect_stdout=True, redirect_stderr=True)
    ids: dict[str, Any] = {}

    def show(progress: Progress) -> None:
        if progress.lineage not in ids:
            ids[progress.lineage] = bars.add_task(progress.lineage, total=progress.generations, where="")
        where = f"gen {progress.generation} of 0-{progress.generations - 1}" + (
            f", epoch {progress.epoch}/{progress.epochs}" if progress.epochs and not progress.finished else "")
        bars.update(ids[progress.lineage], completed=progress.fraction * progress.generations, where=where)

    with ExitStack() as stack:
        stack.enter_context(bars)  # from here on, sys.stderr and sys.stdout write above the bars
        stack.enter_context(watch(show))
        stack.enter_context(logs_to(handlers, console, sys.stderr))
        yield


def terminal_handlers(terminal: tuple) -> list[logging.Handler]:
    """The logging handlers (of any logger) that write to one of the ``terminal`` streams: plain stream handlers,
    and Prefect's console handler, which writes through a rich console of its own."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    found = {id(h): h for logger in loggers for h in logger.handlers
             if isinstance(h, logging.StreamHandler) and h.stream in terminal}
    return list(found.values())


def prefect_log_styles():
    """The colours of Prefect's console log (its logging config), on top of rich's defaults (the bars' own)."""
    from rich.theme import Theme

    try:
        from prefect.logging.configuration import PROCESS_LOGGING_CONFIG

        styles = PROCESS_LOGGING_CONFIG["handlers"]["console"].get("styles") or {}
    except (ImportError, KeyError, TypeError):
        styles = {}
    return Theme(styles)


@contextmanager
def logs_to(handlers: list[logging.Handler], console, stream) -> Iterator[None]:
    """For the block, the handlers write through ``console`` (those with a rich console of their own: a rich
    console does not write into another's redirected stream) or to ``stream`` (the others)."""
    undo: list[Callable[[], None]] = []
    for handler in handlers:
        if getattr(handler, "console", None) is not None:
            original = handler.console
            handler.console = console
            undo.append(lambda handler=handler, original=original: setattr(handler, "console", original))
        else:
            original = handler.setStream(stream)
            undo.append(lambda handler=handler, original=original: handler.setStream(original))
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()
