"""The self-consuming loop as Prefect flows.

``self_consuming_loop`` is one study: the real data, the domain classifier, then every lineage in params.
``lineage_loop`` is one lineage, generation by generation (``tasks.generation.run_generation``)::

    dataset[k] --fit--> model[k] --sample--> synthetic[k+1] --next dataset--> dataset[k+1]
                           '--score(vs held-out real)--> metrics[k]

Both take params as a plain dict (what a deployment or the CLI passes) and a project root.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.fanout import check_target, fan_out, prepare_fan_out
from tasks import as_task
from tasks.generation import (PLAIN, TASKS, Lineage, Steps, load_generation_dataset, load_generation_model, load_model,
                              open_lineage, rescore_manifest, resolve_device, run_generation)
from tasks.layout import SUMMARY_MD, StudyPaths
from tasks.lock import study_lock
from tasks.params import Params, digest, lineage_recipe, validate
from tasks.progress import LineageWatch, generation_line, study_summary_artifact
from tasks.realdata import prepare_real_data_task
from tasks.recovery import clean_up_dead_runs
from tasks.reports import (lineage_rows, recipe_hashes, recipe_metrics, recipe_summary, seeded,
                           summary_columns, write_reports_task)
from tasks.resume import (LineageState, StaleOutputsError, check_names, check_world, inspect_lineage, preflight,
                          quarantine_from, real_train_data)
from tasks.scorers import build_scorer
from tasks.seeds import SCORE, derive_seed
from tasks.sizing import check_fits
from tasks.tracking import close_lineage, log_generations, log_recipe_runs, open_experiment, run_url, tracking_uri
from tasks.tracking import open_lineage as open_lineage_run
from tasks.versioning import dvc_add, find_dvc_root

build_scorer_task = as_task(build_scorer)
log_generations_task = as_task(log_generations, retries=2)
dvc_add_task = as_task(dvc_add, retries=2)
FLUSH_SECONDS = 10.0  # cheap generations' records are sent at least this often (and when the lineage ends)


def lineage_run_name() -> str:
    """A lineage's flow run: ``<study>/<lineage>``."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    return f"{(parameters['params'].get('study') or {}).get('name', 'default')}/{parameters['lineage']}"


def study_run_name() -> str:
    from prefect.runtime import flow_run

    study = ((flow_run.parameters.get("params") or {}).get("study") or {}).get("name", "default")
    return f"study {study}"


def tag_this_run(*names: str) -> None:
    """Add tags to the running flow run (tags of a run made elsewhere, a deployment's, are set at its creation)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    wanted = list(dict.fromkeys([*flow_run.tags, *names]))
    if flow_run.id and wanted != list(flow_run.tags):
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=wanted)


def named_steps(lineage: str, k: int) -> Steps:
    """The Prefect-task steps, each run named ``fit-model [mle gen 3]``."""
    return Steps(*(step.with_options(task_run_name=f"{step.name} [{lineage} gen {k}]")
                   for step in (TASKS.fit, TASKS.sample, TASKS.score, TASKS.save)))


def lineage_tags(lin: Lineage) -> list[str]:
    return [f"lineage:{lin.name}", f"recipe:{lin.spec.group or lin.name}", f"estimator:{lin.spec.estimator}",
            f"family:{lin.family.name}"]


def resume_point(lin: Lineage, state: LineageState, logger) -> int:
    """The first generation to run: stale outputs stop the run; corrupt ones are quarantined and redone."""
    if state.stale:
        raise StaleOutputsError(f"{lin.folder} holds generations made under other params: " + "; ".join(state.stale))
    if state.corrupt:
        moved = quarantine_from(lin.paths, lin.folder, state.next_generation)
        logger.warning(f"{state.corrupt}: not used; generation {state.next_generation} and later are redone "
                       f"(old files moved to {moved})")
    return min(state.next_generation, lin.params.loop.generations)


def rescored(lin: Lineage, manifest: dict[str, Any]) -> dict[str, Any]:
    """A finished generation's manifest with its metrics recomputed when the scoring params changed."""
    if manifest.get("score_hash") == lin.score_hash:
        return manifest
    k = manifest["generation"]
    model = load_model(lin.family, load_generation_model(lin.folder, k), lin.device)
    _, metrics = TASKS.score(lin.scorer, model, derive_seed(lin.seed, k, SCORE))
    dataset = lin.real.train if k == 0 else load_generation_dataset(lin.folder, k)
    metrics.update(lin.scorer.dataset_metrics(lin.mode.training_rows(k, dataset)))
    kept = {key: value for key, value in manifest["metrics"].items() if key not in metrics}  # e.g. weight stats
    return rescore_manifest(lin.folder, manifest, {**kept, **metrics}, lin.score_hash)


@flow(name="lineage", flow_run_name=lineage_run_name, log_prints=False)
def lineage_loop(params: dict[str, Any], lineage: str, root: str = ".",
                 verified: dict[str, Any] | None = None, dvc_add_at_end: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) one lineage for ``loop.generations`` generations; return its per-generation rows.
    ``verified``: the lineage's state as the study just verified it (else it is verified here).
    ``dvc_add_at_end``: False when the caller adds the lineage's folder itself (the study: one ``dvc add`` for
    every lineage it ran in its process)."""
    logger = get_run_logger()
    p = validate(params)
    paths = StudyPaths(Path(root).resolve(), p.study.name)
    device = resolve_device(p.device)
    real = prepare_real_data_task(p, paths, [p.lineage(lineage)])
    scorer, scorer_note = build_scorer_task(p, real.split, paths.cache, device)
    lin = open_lineage(p, lineage, paths, real, scorer, device)
    tag_this_run("madloop", f"study:{p.study.name}", *lineage_tags(lin))
    state = LineageState(**verified) if verified else inspect_lineage(lin.folder, lin.recipe,
                                                                      real_train_data(paths, lin.real_file))
    generations = lin.params.loop.generations
    start = resume_point(lin, state, logger)
    if start:
        logger.info(f"[{lin.name}] resuming: generations 0-{start - 1} are finished and verified")

    uri = tracking_uri(p.tracking.uri, paths.root)
    run_tags = {"lineage": lin.name, "estimator": lin.spec.estimator, "loop_mode": lin.params.loop.mode,
                "mitigation": lin.spec.mitigation, "recipe": lin.spec.group or lin.name,
                "data_source": p.data.source, "seed": str(lin.seed), "study": p.study.name,
                "model_family": lin.family.name, "scorer": scorer_note}
    run_name = lin.name if p.tracking.experiment is None else f"{p.study.name}/{lin.name}"
    exp_id, parent_id = open_lineage_run(uri, p.experiment, lin.name, digest(lin.recipe), run_tags, paths.root,
                                         run_name=run_name, params=lin.recipe)
    logger.info(f"[{lin.name}] MLflow run: {run_url(uri, exp_id, parent_id)}")
    cheap_under = p.tracking.cheap_fit_seconds

    def cheap(manifest: dict[str, Any] | None) -> bool:
        return manifest is not None and manifest["info"].get("fit_seconds", float("inf")) < cheap_under

    def record(batch: list[dict[str, Any]]) -> None:
        """MLflow for a batch of finished generations; dvc add when one of them was slow (cheap ones: at the end)."""
        if not batch:
            return
        first, last = batch[0]["generation"], batch[-1]["generation"]
        which = f"gen {first}" if first == last else f"gens {first}-{last}"
        log_generations_task.with_options(task_run_name=f"log-generations [{lin.name} {which}]")(
            uri, exp_id, parent_id, lin.name, batch, lin.folder, paths.root, lin.recipe, cheap_under)
        if p.dvc.track and not all(cheap(m) for m in batch):
            dvc_add_task.with_options(task_run_name=f"dvc-add [{lin.name} {which}]")(paths.root, [lin.folder])

    watch = LineageWatch(p.study.name, lin.name, generations, summary_columns(p), start)
    manifests = [rescored(lin, manifest) for manifest in state.finished[:generations]]
    record(manifests)  # a resumed lineage's finished generations: recorded once, whatever was recorded before
    if manifests:
        watch.table(lineage_rows(lin.spec, manifests))

    dataset = lin.real.train if start == 0 else load_generation_dataset(lin.folder, start)
    lin.mitigation.resume(manifests)
    pending: list[dict[str, Any]] = []
    flushed = time.monotonic()
    try:
        for k in range(start, generations):
            steps = PLAIN if cheap(manifests[-1] if manifests else None) else named_steps(lin.name, k)
            generation = run_generation(lin, k, dataset, steps, progress=watch.epoch_callback(k))
            manifest = generation.manifest
            manifests.append(manifest)
            pending.append(manifest)
            watch.generation_done(k)
            if not cheap(manifest) or time.monotonic() - flushed >= FLUSH_SECONDS or k == generations - 1:
                record(pending)
                watch.table(lineage_rows(lin.spec, manifests))
                logger.info(generation_line(lin.name, pending[0]["generation"], k, generations,
                                            scorer.describe(manifest["metrics"]),
                                            manifest["info"].get("fit_seconds", 0.0)))
                pending, flushed = [], time.monotonic()
            dataset = generation.next_dataset
    except BaseException as err:
        close_lineage(uri, parent_id, "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if p.dvc.track and manifests and dvc_add_at_end:
        dvc_add_task.with_options(task_run_name=f"dvc-add [{lin.name}]")(paths.root, [lin.folder])
    close_lineage(uri, parent_id)
    return lineage_rows(lin.spec, manifests)


@flow(name="self_consuming_loop", flow_run_name=study_run_name, log_prints=False)
def self_consuming_loop(params: dict[str, Any] | None = None, root: str = ".", lineages: list[str] | None = None,
                        overwrite: bool = False, lineage_deployment: str | None = None,
                        force: bool = False) -> list[dict[str, Any]]:
    """A study: every lineage in params (or the named ones) over the same real data and test split.

    Lineages run here, one after another, as subflows. With ``lineage_deployment`` ("lineage/gpu") each one runs
    as its own flow run of that deployment instead, all at once, on the workers of its work pool (flows.fanout).
    ``force``: run even when the study's estimated memory or disk exceeds this machine's (tasks.sizing).
    """
    p = validate(params)
    with study_lock(StudyPaths(Path(root).resolve(), p.study.name).lock, p.study.name):
        return run_locked_study(p, root, lineages, overwrite, lineage_deployment, force)


def run_locked_study(p: Params, root: str, lineages: list[str] | None, overwrite: bool,
                     lineage_deployment: str | None, force: bool = False) -> list[dict[str, Any]]:
    logger = get_run_logger()
    tag_this_run("madloop", f"study:{p.study.name}")
    plan = preflight(p, Path(root), lineages, overwrite)
    if not lineage_deployment:  # fanned out, each lineage runs on a worker's machine, not this one
        check_fits(p, plan.paths.root, plan.lineages, force)
    paths = plan.paths
    target = prepare_fan_out(lineage_deployment, p, [s.name for s in plan.lineages]) if lineage_deployment else None
    for line in clean_up_dead_runs(p, paths, [self_consuming_loop.name, lineage_loop.name],
                                   find_dvc_root(paths.root) if p.dvc.track else None):
        logger.info(line)
    device = resolve_device(p.device)
    real = prepare_real_data_task(p, paths, plan.lineages)
    scorer, scorer_note = build_scorer_task(p, real.split, paths.cache, device)
    sizes = sorted({len(r.train) for r in real.lineages.values()})
    rows = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    what = (f"classes {p.data.majority}/{p.data.minority} (R_I = {p.data.imbalance_ratio:g})"
            if real.split.num_classes else f"draws of the {p.model.family} truth")
    draws = len(set(real.files.values()))
    logger.info(f"study {p.study.name!r}: {rows} real training rows of {p.data.source}, {what}, "
                f"{draws} real draw{'s' if draws > 1 else ''} (data.draw: {p.data.draw}); {scorer_note}; device {device}")
    logger.info(f"MLflow experiment {p.experiment!r}: "
                f"{open_experiment(tracking_uri(p.tracking.uri, paths.root), p.experiment, paths.root)}")
    if p.dvc.track:
        dvc_add_task(paths.root, [paths.real])
    rows: list[dict[str, Any]] | None = None
    if target:
        fan_out(target, p, [spec.name for spec in plan.lineages], paths.root)
    else:
        rows = []
        # In-process lineages send no heartbeats of their own: the study's flow run, in the same process, already
        # does (a crash stops both), and joining each one's heartbeat thread, which sleeps in 1 s steps, held up
        # the end of its lineage by up to 1 s (docs/performance.md).
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for spec in plan.lineages:
                state = inspect_lineage(paths.lineage(spec.name), lineage_recipe(p, spec),
                                        real_train_data(paths, real.files[spec.name]))
                rows += lineage_loop(params=p.model_dump(mode="json"), lineage=spec.name, root=str(paths.root),
                                     verified=state.as_dict(), dvc_add_at_end=False)
        if p.dvc.track:  # one `dvc add` for every lineage (slow generations were also added one by one)
            dvc_add_task.with_options(task_run_name="dvc-add [lineages]")(
                paths.root, [paths.lineage(spec.name) for spec in plan.lineages])
    everyone = rows is not None and len(plan.lineages) == len(p.lineages)
    rows = write_reports_task(p, paths, p.lineages, rows if everyone else None, getattr(scorer, "labeller", None))
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
                                       overwrite=False, lineage_deployment=lineage_deployment, force=force)
