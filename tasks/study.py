"""A study as plain Python: open it once, then run its lineages; whatever records or shows a run observes it.

    study = Study.open(p, root)                 # checked, real data written, scorer built, lineages verified: once
    for spec in study.lineages:
        manifests = study.run_lineage(spec.name, observers=[...])

:meth:`Study.open` does everything that comes before work, in this order: the checks against the world and the
outputs on disk (``tasks.resume.preflight``; the caller holds the study's lock), whether the study fits this
machine (``tasks.sizing``), the real data (``tasks.realdata``), the scorer, and each chosen lineage's state (every
file of its finished generations verified once). :meth:`Study.run_lineage` resumes a lineage where its verified
state ends (re-scoring finished generations through ``tasks.generation.score_generation``, as a generation scores
itself) and runs ``tasks.generation.run_generation`` for the rest, telling its :class:`Observer` s what happens.

Nothing here imports Prefect, MLflow or DVC: the Prefect flows (``flows.loop``) are a shell over this module, and
MLflow recording, ``dvc add`` and progress are observers at the edge (``tasks.observers``). Tests and benchmarks
run studies with no observers at all.

A lineage is recorded in batches or per generation (:func:`records_batched`), decided before any fit by params and
its family's kind, so the same study records the same MLflow runs on any machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from models.families import FAMILIES
from tasks.generation import (PLAIN, Generation, Lineage, Steps, load_generation_dataset, open_lineage, rescore,
                              resolve_device, run_generation)
from tasks.layout import StudyPaths
from tasks.params import LineageParams, Params, lineage_recipe
from tasks.realdata import StudyReal, prepare_real_data
from tasks.resume import (LineageState, StaleOutputsError, inspect_lineage, preflight, quarantine_from,
                          real_train_data)
from tasks.scorers import build_scorer
from tasks.sizing import check_fits

FLUSH_SECONDS = 10.0  # a batched lineage's records go out at least this often (liveness; not what is recorded)
# how often this process checked, prepared the real data and built the scorer: once per study (tests count them)
OPENED = {"checks": 0, "real data": 0, "scorer": 0}


def records_batched(p: Params) -> bool:
    """Whether a lineage (``p``: its params) has its generations recorded in batches (plain-function steps, records
    on its MLflow run only, ``dvc add`` at its end) rather than one by one: ``tracking.batch_records``, by default
    for the scalar families, whose fits take milliseconds. Decided by params alone, never by how long a fit took."""
    setting = p.tracking.batch_records
    return FAMILIES.get(p.model.family).kind == "scalar" if setting == "auto" else setting == "always"


@dataclass
class LineageRun:
    """One run of one lineage, as its observers see it: generations ``start`` to ``generations - 1`` run now."""

    study: Study
    lineage: Lineage
    start: int
    generations: int
    batched: bool
    quarantined: str | None = None  # why the old outputs of generation ``start`` and later were moved away, and where

    @property
    def name(self) -> str:
        return self.lineage.name


class Observer:
    """What hears a study being opened and its lineages run; every hook does nothing unless overridden. A lineage's
    observers hear ``lineage_started`` in the order given and ``lineage_done`` / ``lineage_failed`` in reverse
    (the first one opened is the last one closed)."""

    def study_checked(self, p: Params, paths: StudyPaths, lineages: list[LineageParams]) -> None:
        """The checks passed; nothing has been prepared yet."""

    def lineage_started(self, run: LineageRun, finished: list[dict[str, Any]]) -> None:
        """Before generation ``run.start``; ``finished``: the manifests of generations 0 to ``run.start - 1``
        (re-scored when the scoring params changed)."""

    def generation_started(self, run: LineageRun, k: int) -> Callable[[int, int], None] | None:
        """Generation k begins; may return the ``progress(done, total)`` its fit calls once per epoch."""

    def generation_done(self, run: LineageRun, generation: Generation) -> None:
        """Generation k is saved (``generation.manifest``)."""

    def generations_done(self, run: LineageRun, batch: list[dict[str, Any]], manifests: list[dict[str, Any]]) -> None:
        """A batch of saved generations to record (one generation unless ``run.batched``); ``manifests``: every
        generation of the lineage so far."""

    def lineage_done(self, run: LineageRun, manifests: list[dict[str, Any]]) -> None:
        """Every generation is saved and recorded."""

    def lineage_failed(self, run: LineageRun, status: str) -> None:
        """The run stopped on an error: ``status`` is KILLED (interrupted) or FAILED."""


def fit_progress(callbacks: Iterable[Callable[[int, int], None] | None]) -> Callable[[int, int], None] | None:
    """One ``progress(done, total)`` calling every observer's (None when none listens: the fit reports nothing)."""
    listening = [callback for callback in callbacks if callback is not None]
    if len(listening) < 2:
        return listening[0] if listening else None

    def every(done: int, total: int) -> None:
        for callback in listening:
            callback(done, total)

    return every


@dataclass
class Study:
    """A study opened for work: its params, folders, chosen lineages, real data, scorer and device, and the state
    of each chosen lineage as :meth:`open` verified it (used by the lineage's first run here)."""

    p: Params
    paths: StudyPaths
    lineages: list[LineageParams]
    real: StudyReal
    scorer: Any
    scorer_note: str
    device: Any
    states: dict[str, LineageState] = field(default_factory=dict)

    @classmethod
    def open(cls, p: Params, root: Path, lineages: list[str] | None = None, *, overwrite: bool = False,
             force: bool = False, check: bool = True, here: bool = True,
             observers: Iterable[Observer] = ()) -> Study:
        """Everything before work, once. ``lineages``: the names to run (default: all). ``check``: the checks
        against the world and the outputs on disk (:func:`tasks.resume.preflight`; ``overwrite`` moves stale
        outputs to the trash) and against this machine's size (``force``: run anyway); False for callers that
        own a fresh root (tests, benchmarks), or that checked already (``flows.loop.run_study``, a lineage whose
        study checked it). ``here``: the lineages run in this process (False: fanned out to other machines, which
        size and verify them themselves)."""
        root = Path(root).resolve()
        if check:
            chosen = preflight(p, root, lineages, overwrite).lineages
            if here:
                check_fits(p, root, chosen, force)
            OPENED["checks"] += 1
        else:
            chosen = [p.lineage(name) for name in lineages] if lineages else list(p.lineages)
        paths = StudyPaths(root, p.study.name)
        for observer in observers:
            observer.study_checked(p, paths, chosen)
        device = resolve_device(p.device)
        real = prepare_real_data(p, paths, chosen)
        OPENED["real data"] += 1
        scorer, scorer_note = build_scorer(p, real.split, paths.cache, device)
        OPENED["scorer"] += 1
        study = cls(p, paths, chosen, real, scorer, scorer_note, device)
        if here:
            study.states = {spec.name: study.inspect(spec.name) for spec in chosen}
        return study

    def describe(self) -> str:
        """A line for the log: the real data, the scorer and the device."""
        p, real = self.p, self.real
        sizes = sorted({len(r.train) for r in real.lineages.values()})
        rows = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        what = (f"classes {p.data.majority}/{p.data.minority} (R_I = {p.data.imbalance_ratio:g})"
                if real.split.num_classes else f"draws of the {p.model.family} truth")
        draws = len(set(real.files.values()))
        return (f"study {p.study.name!r}: {rows} real training rows of {p.data.source}, {what}, {draws} real "
                f"draw{'s' if draws > 1 else ''} (data.draw: {p.data.draw}); {self.scorer_note}; device {self.device}")

    def lineage(self, name: str) -> Lineage:
        """Lineage ``name`` with its parts, over this study's real data and scorer."""
        return open_lineage(self.p, name, self.paths, self.real, self.scorer, self.device)

    def inspect(self, name: str) -> LineageState:
        """What of lineage ``name`` is finished and verified on disk (every file's sha256 checked)."""
        return inspect_lineage(self.paths.lineage(name), lineage_recipe(self.p, self.p.lineage(name)),
                               real_train_data(self.paths, self.real.files[name]))

    def run_lineage(self, name: str, observers: Iterable[Observer] = (),
                    steps: Steps | Callable[[Lineage, int], Steps] = PLAIN,
                    generations: int | None = None) -> list[dict[str, Any]]:
        """Run (or resume) lineage ``name`` up to ``generations`` (default ``loop.generations``); return the
        manifests of all its generations. Outputs made under other params stop it (StaleOutputsError); outputs
        that cannot be trusted are moved to the trash and redone. ``steps``: the steps of a generation recorded
        one by one (or a function of the lineage and k giving them); a batched lineage runs plain functions."""
        observers = list(observers)
        lin = self.lineage(name)
        state = self.states.pop(name, None) or self.inspect(name)  # verified at open: used by the first run only
        if state.stale:
            raise StaleOutputsError(f"{lin.folder} holds generations made under other params: " + "; ".join(state.stale))
        total = lin.params.loop.generations if generations is None else generations
        quarantined = None
        if state.corrupt:
            moved = quarantine_from(lin.paths, lin.folder, state.next_generation)
            quarantined = (f"{state.corrupt}: not used; generation {state.next_generation} and later are redone "
                           f"(old files moved to {moved})")
        run = LineageRun(self, lin, min(state.next_generation, total), total, records_batched(lin.params), quarantined)
        steps_of = steps if callable(steps) else (lambda _lineage, _k: steps)

        def steps_for(k: int) -> Steps:
            return PLAIN if run.batched else steps_of(lin, k)

        finished = [rescore(lin, manifest, steps_for(manifest["generation"]))
                    for manifest in state.finished[:total]]
        started: list[Observer] = []
        try:
            for observer in observers:
                observer.lineage_started(run, finished)
                started.append(observer)
            manifests = self.run_generations(run, finished, observers, steps_for)
        except BaseException as err:
            status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
            for observer in reversed(started):
                observer.lineage_failed(run, status)
            raise
        for observer in reversed(observers):
            observer.lineage_done(run, manifests)
        return manifests

    def run_generations(self, run: LineageRun, finished: list[dict[str, Any]], observers: list[Observer],
                    steps_for: Callable[[int], Steps]) -> list[dict[str, Any]]:
        """Generations ``run.start`` to the last, each handed to the observers when saved, recorded in batches
        (a batched lineage: when ``FLUSH_SECONDS`` passed, and at its end) or one by one."""
        lin = run.lineage
        dataset = lin.real.train if run.start == 0 else load_generation_dataset(lin.folder, run.start)
        lin.mitigation.resume(finished)
        manifests, pending, flushed = list(finished), [], time.monotonic()
        for k in range(run.start, run.generations):
            progress = fit_progress(observer.generation_started(run, k) for observer in observers)
            generation = run_generation(lin, k, dataset, steps_for(k), progress=progress)
            manifests.append(generation.manifest)
            pending.append(generation.manifest)
            for observer in observers:
                observer.generation_done(run, generation)
            if not run.batched or time.monotonic() - flushed >= FLUSH_SECONDS or k == run.generations - 1:
                for observer in observers:
                    observer.generations_done(run, pending, manifests)
                pending, flushed = [], time.monotonic()
            dataset = generation.next_dataset
        return manifests
