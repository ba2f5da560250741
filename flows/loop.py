"""The self-consuming loop as Prefect flows.

``self_consuming_loop`` is one study: the real data, the domain classifier, then every lineage in params.
``lineage_loop`` is one lineage, generation by generation (``tasks.generation.run_generation``)::

    dataset[k] --fit--> model[k] --sample--> synthetic[k+1] --next dataset--> dataset[k+1]
                           '--score(vs held-out real)--> metrics[k]

Both take params as a plain dict (what a deployment or the CLI passes) and a project root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.fanout import fan_out
from tasks import as_task
from tasks.generation import (TASKS, Lineage, load_generation_dataset, load_generation_model, load_model, open_lineage,
                              rescore_manifest, resolve_device, run_generation)
from tasks.layout import StudyPaths
from tasks.params import Params, digest, flatten, lineage_recipe, validate
from tasks.realdata import prepare_real_data_task
from tasks.reports import lineage_rows, write_reports_task
from tasks.resume import LineageState, StaleOutputsError, inspect_lineage, preflight, quarantine_from, real_train_sha
from tasks.scorers import build_scorer
from tasks.seeds import SCORE, derive_seed
from tasks.tracking import close_lineage, log_generation, tracking_uri
from tasks.tracking import open_lineage as open_lineage_run
from tasks.versioning import dvc_add

build_scorer_task = as_task(build_scorer)
log_generation_task = as_task(log_generation, retries=2)
dvc_add_task = as_task(dvc_add, retries=2)


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


@flow(name="lineage", flow_run_name="{lineage}", log_prints=False)
def lineage_loop(params: dict[str, Any], lineage: str, root: str = ".",
                 verified: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) one lineage for ``loop.generations`` generations; return its per-generation rows.
    ``verified``: the lineage's state as the study just verified it (else it is verified here)."""
    logger = get_run_logger()
    p = validate(params)
    paths = StudyPaths(Path(root).resolve(), p.study.name)
    device = resolve_device(p.device)
    real = prepare_real_data_task(p, paths)
    scorer, scorer_note = build_scorer_task(p, real, paths.cache, device)
    lin = open_lineage(p, lineage, paths, real, scorer, device)
    state = LineageState(**verified) if verified else inspect_lineage(lin.folder, lin.recipe, real_train_sha(paths))
    generations = lin.params.loop.generations
    start = resume_point(lin, state, logger)
    if start:
        logger.info(f"[{lin.name}] resuming: generations 0-{start - 1} are finished and verified")

    uri = tracking_uri(p.tracking.uri, paths.root)
    tags = {"lineage": lin.name, "estimator": lin.spec.estimator, "loop_mode": lin.params.loop.mode,
            "mitigation": lin.spec.mitigation, "recipe": lin.spec.group or lin.name,
            "data_source": p.data.source, "seed": str(lin.seed), "study": p.study.name,
            "model_family": lin.family.name, "scorer": scorer_note}
    run_name = lin.name if p.experiment == p.study.name else f"{p.study.name}/{lin.name}"
    exp_id, parent_id = open_lineage_run(uri, p.experiment, lin.name, digest(lin.recipe), tags, paths.root,
                                         run_name=run_name)
    run_params = flatten(lin.recipe)

    manifests = []
    for manifest in state.finished[:generations]:
        manifest = rescored(lin, manifest)
        log_generation_task(uri, exp_id, parent_id, lin.name, manifest, lin.folder, paths.root, run_params)
        manifests.append(manifest)

    dataset = real.train if start == 0 else load_generation_dataset(lin.folder, start)
    lin.mitigation.resume(manifests)
    try:
        for k in range(start, generations):
            generation = run_generation(lin, k, dataset, TASKS)
            log_generation_task(uri, exp_id, parent_id, lin.name, generation.manifest, lin.folder, paths.root,
                                run_params)
            if p.dvc.track:
                dvc_add_task(paths.root, [lin.folder])
            logger.info(f"[{lin.name}] generation {k}/{generations - 1}: "
                        f"{scorer.describe(generation.manifest['metrics'])}  "
                        f"fit {generation.model.info.get('fit_seconds', 0.0):.1f}s")
            manifests.append(generation.manifest)
            dataset = generation.next_dataset
    except BaseException as err:
        close_lineage(uri, parent_id, "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if p.dvc.track and start == generations and manifests:
        dvc_add_task(paths.root, [lin.folder])  # nothing new, but make sure a resumed lineage is tracked
    close_lineage(uri, parent_id)
    return lineage_rows(lin.spec, manifests)


@flow(name="self_consuming_loop", log_prints=False)
def self_consuming_loop(params: dict[str, Any] | None = None, root: str = ".", lineages: list[str] | None = None,
                        overwrite: bool = False, lineage_deployment: str | None = None) -> list[dict[str, Any]]:
    """A study: every lineage in params (or the named ones) over the same real data and test split.

    Lineages run here, one after another, as subflows. With ``lineage_deployment`` ("lineage/gpu") each one runs
    as its own flow run of that deployment instead, all at once, on the workers of its work pool (flows.fanout).
    """
    logger = get_run_logger()
    p = validate(params)
    plan = preflight(p, Path(root), lineages, overwrite)
    paths = plan.paths
    device = resolve_device(p.device)
    real = prepare_real_data_task(p, paths)
    _, scorer_note = build_scorer_task(p, real, paths.cache, device)
    what = (f"classes {p.data.majority}/{p.data.minority} (R_I = {p.data.imbalance_ratio:g})"
            if real.num_classes else f"draws of the {p.model.family} truth")
    logger.info(f"study {p.study.name!r}: {len(real.train)} real training rows of {p.data.source}, {what}; "
                f"{scorer_note}; device {device}")
    if p.dvc.track:
        dvc_add_task(paths.root, [paths.real])
    rows: list[dict[str, Any]] | None = None
    if lineage_deployment:
        fan_out(lineage_deployment, p, [spec.name for spec in plan.lineages], paths.root)
    else:
        rows = []
        train_sha = real_train_sha(paths)
        # In-process lineages send no heartbeats of their own: the study's flow run, in the same process, already
        # does (a crash stops both), and joining each one's heartbeat thread, which sleeps in 1 s steps, held up
        # the end of its lineage by up to 1 s (docs/performance.md).
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for spec in plan.lineages:
                state = inspect_lineage(paths.lineage(spec.name), lineage_recipe(p, spec), train_sha)
                rows += lineage_loop(params=p.model_dump(mode="json"), lineage=spec.name, root=str(paths.root),
                                     verified=state.as_dict())
    everyone = rows is not None and len(plan.lineages) == len(p.lineages)
    return write_reports_task(p, paths, p.lineages, rows if everyone else None)


def run_study(p: Params, root: Path, lineages: list[str] | None = None, overwrite: bool = False):
    """Validate against the world first (no Prefect run is started for bad input), then run the flow."""
    preflight(p, root, lineages, overwrite)
    return self_consuming_loop(params=p.model_dump(mode="json"), root=str(root), lineages=lineages,
                               overwrite=False)
