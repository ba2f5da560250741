"""What a running lineage shows its watchers: Prefect artifacts on its flow run and the CLI's progress bar.

Each lineage flow run gets a progress artifact (generations done, and the running fit's epochs in between) and a
table artifact (its per-generation metrics, one new version per generation or batch of cheap ones); the study's
run gets its summary as a markdown artifact. In the same process, :func:`watch` registers a listener (the
``madloop run`` progress bar) that sees every :class:`Progress` report. Reports cost nothing when no one listens,
and the progress artifact is updated at most every ``UPDATE_SECONDS`` (epochs of a small fit take milliseconds).
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
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
