"""The observers of a lineage run (``tasks.study``) that the Prefect flows attach: MLflow records, ``dvc add``, and
what watchers see (Prefect artifacts, progress bars, log lines).

- :class:`MlflowRecorder`: the lineage's parent run, opened when it starts (its finished generations recorded
  again, idempotently), each batch of saved generations recorded (``tasks.tracking.log_generations``), closed
  FINISHED, FAILED or KILLED.
- :class:`DvcAdder`: ``dvc add`` of the lineage's folder after each generation of a lineage recorded one by one,
  and at the lineage's end (unless the study adds every folder itself once).
- :class:`Watch`: the progress and table artifacts and in-process progress bars (``tasks.progress``), and the
  log lines (resumed, quarantined, each generation or batch done).

Their MLflow and ``dvc add`` calls run as Prefect tasks (named ``log-generations [mle gen 3]``), retried when a
store or DVC's lock is briefly busy.
"""

from __future__ import annotations

from typing import Any, Callable

from tasks import as_task
from tasks.params import digest
from tasks.progress import LineageWatch, generation_line
from tasks.reports import lineage_rows, summary_columns
from tasks.study import LineageRun, Observer
from tasks.tracking import close_lineage, log_generations, open_lineage, run_url, tracking_uri
from tasks.versioning import dvc_add

log_generations_task = as_task(log_generations, retries=2)
dvc_add_task = as_task(dvc_add, retries=2)


def which(batch: list[dict[str, Any]]) -> str:
    first, last = batch[0]["generation"], batch[-1]["generation"]
    return f"gen {first}" if first == last else f"gens {first}-{last}"


class MlflowRecorder(Observer):
    """The lineage's MLflow parent run and what it records. A batched lineage's sample image goes on the parent at
    its last generation (and, resumed, at the last one finished before): the same steps on any machine."""

    def __init__(self, logger):
        self.logger = logger
        self.uri = self.exp_id = self.parent_id = None

    def lineage_started(self, run: LineageRun, finished: list[dict[str, Any]]) -> None:
        p, lin = run.study.p, run.lineage
        self.uri = tracking_uri(p.tracking.uri, run.study.paths.root)
        tags = {"lineage": lin.name, "estimator": lin.spec.estimator, "loop_mode": lin.params.loop.mode,
                "mitigation": lin.spec.mitigation, "recipe": lin.spec.group or lin.name, "data_source": p.data.source,
                "seed": str(lin.seed), "study": p.study.name, "model_family": lin.family.name,
                "scorer": run.study.scorer_note}
        run_name = lin.name if p.tracking.experiment is None else f"{p.study.name}/{lin.name}"
        self.exp_id, self.parent_id = open_lineage(self.uri, p.experiment, lin.name, digest(lin.recipe), tags,
                                                   run.study.paths.root, run_name=run_name, params=lin.recipe)
        self.logger.info(f"[{lin.name}] MLflow run: {run_url(self.uri, self.exp_id, self.parent_id)}")
        if finished:  # a resumed lineage's finished generations: recorded once, whatever was recorded before
            self.record(run, finished, {finished[-1]["generation"]})

    def generations_done(self, run: LineageRun, batch: list[dict[str, Any]], manifests: list[dict[str, Any]]) -> None:
        self.record(run, batch, {run.generations - 1})

    def record(self, run: LineageRun, batch: list[dict[str, Any]], images: set[int]) -> None:
        lin = run.lineage
        log_generations_task.with_options(task_run_name=f"log-generations [{lin.name} {which(batch)}]")(
            self.uri, self.exp_id, self.parent_id, lin.name, batch, lin.folder, run.study.paths.root, lin.recipe,
            run.batched, images if run.batched else None)

    def lineage_done(self, run: LineageRun, manifests: list[dict[str, Any]]) -> None:
        close_lineage(self.uri, self.parent_id)

    def lineage_failed(self, run: LineageRun, status: str) -> None:
        close_lineage(self.uri, self.parent_id, status)


class DvcAdder(Observer):
    """``dvc add`` of the lineage's folder: after each generation unless the lineage is batched, and at its end
    unless ``at_end`` is False (the study adds every lineage's folder itself, in one call)."""

    def __init__(self, at_end: bool = True):
        self.at_end = at_end

    def lineage_started(self, run: LineageRun, finished: list[dict[str, Any]]) -> None:
        if finished and not run.batched:  # recorded again (MLflow): so is the folder, as after each generation
            self.add(run, f"[{run.name} {which(finished)}]")

    def generations_done(self, run: LineageRun, batch: list[dict[str, Any]], manifests: list[dict[str, Any]]) -> None:
        if not run.batched:
            self.add(run, f"[{run.name} {which(batch)}]")

    def lineage_done(self, run: LineageRun, manifests: list[dict[str, Any]]) -> None:
        if self.at_end and manifests:
            self.add(run, f"[{run.name}]")

    def add(self, run: LineageRun, label: str) -> None:
        if run.study.p.dvc.track:
            dvc_add_task.with_options(task_run_name=f"dvc-add {label}")(run.study.paths.root, [run.lineage.folder])


class Watch(Observer):
    """The lineage's progress and table artifacts, progress reports to in-process listeners, and its log lines."""

    def __init__(self, logger):
        self.logger = logger
        self.watch: LineageWatch | None = None

    def lineage_started(self, run: LineageRun, finished: list[dict[str, Any]]) -> None:
        if run.quarantined:
            self.logger.warning(run.quarantined)
        if run.start:
            self.logger.info(f"[{run.name}] resuming: generations 0-{run.start - 1} are finished and verified")
        p = run.study.p
        self.watch = LineageWatch(p.study.name, run.name, run.generations, summary_columns(p), run.start)
        if finished:
            self.watch.table(lineage_rows(run.lineage.spec, finished))

    def generation_started(self, run: LineageRun, k: int) -> Callable[[int, int], None]:
        return self.watch.epoch_callback(k)

    def generation_done(self, run, generation) -> None:
        self.watch.generation_done(generation.k)

    def generations_done(self, run: LineageRun, batch: list[dict[str, Any]], manifests: list[dict[str, Any]]) -> None:
        self.watch.table(lineage_rows(run.lineage.spec, manifests))
        last = batch[-1]
        self.logger.info(generation_line(run.name, batch[0]["generation"], last["generation"], run.generations,
                                         run.study.scorer.describe(last["metrics"]),
                                         last["info"].get("fit_seconds", 0.0)))
