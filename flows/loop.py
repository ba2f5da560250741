"""The self-consuming loop as Prefect flows: a thin shell over the plain runner, ``tasks.study``.

``self_consuming_loop`` is one study: opened once (``Study.open``: checks, the real data, the domain classifier,
each lineage's verified state), then every lineage in params. ``lineage_loop`` is one lineage, generation by
generation (``Study.run_lineage`` over ``tasks.generation.run_generation``)::

    dataset[k] --fit--> model[k] --sample--> synthetic[k+1] --next dataset--> dataset[k+1]
                           '--score(vs held-out real)--> metrics[k]

MLflow records, ``dvc add`` and the progress artifacts are the run's observers (``tasks.observers``); what Prefect
shows (run names, tags, named task steps) is ``flows.runs``. Both flows
take params as a plain dict (what a deployment or the CLI passes) and a project root; a lineage run by the study in
its own process gets the study already open (``OPEN``), one run by a deployment opens it for itself.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.fanout import check_target, fan_out, prepare_fan_out
from flows.runs import lineage_run_name, lineage_tags, named_steps, study_run_name, tag_this_run
from tasks.layout import SUMMARY_MD, StudyPaths
from tasks.lock import study_lock
from tasks.observers import DvcAdder, MlflowRecorder, Watch, dvc_add_task
from tasks.params import LineageParams, Params, validate
from tasks.progress import study_summary_artifact
from tasks.recovery import clean_up_dead_runs
from tasks.reports import lineage_rows, recipe_hashes, recipe_metrics, recipe_summary, seeded, write_reports_task
from tasks.resume import check_names, check_world, preflight
from tasks.sizing import check_fits
from tasks.study import Observer, Study
from tasks.tracking import log_recipe_runs, open_experiment, tracking_uri
from tasks.versioning import find_dvc_root

OPEN: dict[str, Study] = {}  # the studies open in this process, by key: what their in-process lineages run on


@flow(name="lineage", flow_run_name=lineage_run_name, log_prints=False)
def lineage_loop(params: dict[str, Any], lineage: str, root: str = ".", study: str | None = None
                 ) -> list[dict[str, Any]]:
    """Run (or resume) one lineage for ``loop.generations`` generations; return its per-generation rows.
    ``study``: the key (in ``OPEN``) of the study that opened it in this process, which also adds its folder to
    DVC; without it (a deployment's flow run) the lineage opens the study for itself and adds its own folder."""
    logger = get_run_logger()
    opened = OPEN.get(study) if study else None
    here = opened or Study.open(validate(params), Path(root), [lineage], check=False)
    tag_this_run("madloop", f"study:{here.p.study.name}", *lineage_tags(here.p, here.p.lineage(lineage)))
    observers = [MlflowRecorder(logger), DvcAdder(at_end=opened is None), Watch(logger)]
    manifests = here.run_lineage(lineage, observers=observers, steps=named_steps)
    return lineage_rows(here.p.lineage(lineage), manifests)


@flow(name="self_consuming_loop", flow_run_name=study_run_name, log_prints=False)
def self_consuming_loop(params: dict[str, Any] | None = None, root: str = ".", lineages: list[str] | None = None,
                        overwrite: bool = False, lineage_deployment: str | None = None,
                        force: bool = False, checked: bool = False) -> list[dict[str, Any]]:
    """A study: every lineage in params (or the named ones) over the same real data and test split.

    Lineages run here, one after another, as subflows. With ``lineage_deployment`` ("lineage/gpu") each one runs
    as its own flow run of that deployment instead, all at once, on the workers of its work pool (flows.fanout).
    ``force``: run even when the study's estimated memory or disk exceeds this machine's (tasks.sizing).
    ``checked``: the caller ran the checks (``run_study``, under the study's lock it still holds), so they are not
    run again; a flow run from anywhere else (a deployment, a schedule) checks for itself.
    """
    p = validate(params)
    with study_lock(StudyPaths(Path(root).resolve(), p.study.name).lock, p.study.name):
        return run_locked_study(p, root, lineages, overwrite, lineage_deployment, force, checked)


class BeforeWork(Observer):
    """What the study's flow does once the checks pass, before the real data: the fan-out target is checked (and a
    Slurm pool registered), and what a dead run of the study left behind is cleaned up."""

    def __init__(self, lineage_deployment: str | None, logger):
        self.lineage_deployment, self.logger, self.target = lineage_deployment, logger, None

    def study_checked(self, p: Params, paths: StudyPaths, lineages: list[LineageParams]) -> None:
        if self.lineage_deployment:
            self.target = prepare_fan_out(self.lineage_deployment, p, [spec.name for spec in lineages])
        for line in clean_up_dead_runs(p, paths, [self_consuming_loop.name, lineage_loop.name],
                                       find_dvc_root(paths.root) if p.dvc.track else None):
            self.logger.info(line)


def run_locked_study(p: Params, root: str, lineages: list[str] | None, overwrite: bool,
                     lineage_deployment: str | None, force: bool = False, checked: bool = False
                     ) -> list[dict[str, Any]]:
    logger = get_run_logger()
    tag_this_run("madloop", f"study:{p.study.name}")
    before = BeforeWork(lineage_deployment, logger)
    # fanned out, each lineage runs (and is sized and verified) on a worker's machine, not this one
    study = Study.open(p, Path(root), lineages, overwrite=overwrite, force=force, check=not checked,
                       here=not lineage_deployment, observers=[before])
    paths = study.paths
    logger.info(study.describe())
    logger.info(f"MLflow experiment {p.experiment!r}: "
                f"{open_experiment(tracking_uri(p.tracking.uri, paths.root), p.experiment, paths.root)}")
    if p.dvc.track:
        dvc_add_task(paths.root, [paths.real])
    rows: list[dict[str, Any]] | None = None
    if before.target:
        fan_out(before.target, p, [spec.name for spec in study.lineages], paths.root)
    else:
        rows, key = [], f"{p.study.name}@{id(study)}"
        OPEN[key] = study
        # In-process lineages send no heartbeats of their own: the study's flow run, in the same process, already
        # does (a crash stops both), and joining each one's heartbeat thread, which sleeps in 1 s steps, held up
        # the end of its lineage by up to 1 s (docs/performance.md).
        try:
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                for spec in study.lineages:
                    rows += lineage_loop(params=p.model_dump(mode="json"), lineage=spec.name, root=str(paths.root),
                                         study=key)
        finally:
            OPEN.pop(key, None)
        if p.dvc.track:  # one `dvc add` for every lineage (those recorded per generation were also added one by one)
            dvc_add_task.with_options(task_run_name="dvc-add [lineages]")(
                paths.root, [paths.lineage(spec.name) for spec in study.lineages])
    everyone = rows is not None and len(study.lineages) == len(p.lineages)
    rows = write_reports_task(p, paths, p.lineages, rows if everyone else None, getattr(study.scorer, "labeller", None))
    study_summary_artifact(p.study.name, (paths.reports / SUMMARY_MD).read_text())
    recipes = recipe_summary(p, rows, p.lineages)
    if seeded(recipes):
        log_recipe_runs(tracking_uri(p.tracking.uri, paths.root), p.experiment, paths.root, p.study.name, recipes,
                        recipe_metrics(p, rows), recipe_hashes(p))
    return rows


def run_study(p: Params, root: Path, lineages: list[str] | None = None, overwrite: bool = False,
              wait: bool = False, on_wait=print, api=nullcontext, lineage_deployment: str | None = None,
              force: bool = False, paper_studies: Sequence[str] = ()):
    """Validate against the world first (no Prefect run, and with ``api`` no Prefect server, is started for bad
    input), then run the flow, holding the study's lock throughout (``wait``: wait for another run of the study to
    end instead of refusing to start; ``force``: run a study that does not seem to fit this machine).
    ``lineage_deployment``: fan the lineages out (flows.fanout), checked before the study's flow run starts.
    ``paper_studies``: the names a study may not take (:func:`tasks.resume.check_names`)."""
    check_names(p, root, paper_studies)
    chosen = check_world(p, root.resolve(), lineages)  # before the lock file is made: bad input leaves nothing
    check_fits(p, root.resolve(), chosen, force)
    if lineage_deployment:
        check_target(lineage_deployment, p, [s.name for s in p.lineages if lineages is None or s.name in lineages])
    with study_lock(StudyPaths(root.resolve(), p.study.name).lock, p.study.name, wait=wait, on_wait=on_wait):
        plan = preflight(p, root, lineages, overwrite)
        with api():
            if lineage_deployment:
                prepare_fan_out(lineage_deployment, p, [spec.name for spec in plan.lineages])
            return self_consuming_loop(params=p.model_dump(mode="json"), root=str(root), lineages=lineages,
                                       overwrite=False, lineage_deployment=lineage_deployment, force=force,
                                       checked=True)
