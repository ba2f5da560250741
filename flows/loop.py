"""The self-consuming loop as Prefect flows.

``self_consuming_loop`` is one study: the real data, the domain classifier, then every lineage in params.
``lineage_loop`` is one lineage, generation by generation::

    dataset[k] --fit--> model[k] --sample--> synthetic[k+1] --mix(mode)--> dataset[k+1]
                           '--score(vs held-out real)--> metrics[k]

Both take params as a plain dict (what a deployment or the CLI passes) and a project root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from tasks import as_task
from tasks.mitigation import dynamic_next_dataset, dynamic_shares, reference_set, training_weights
from tasks.params import (Params, digest, flatten, lineage_mode, lineage_recipe, lineage_seed, score_recipe,
                          validate)
from tasks.scoring import build_scorer_task
from tasks.storage import file_digest
from tasks.study import (StaleOutputsError, StudyPaths, inspect_lineage, load_generation_dataset,
                         load_generation_model, preflight, prepare_real_data_task, quarantine_from,
                         real_train_sha, rescore_manifest, save_generation_task, write_reports_task)
from tasks.tracking import close_lineage, log_generation, open_lineage, tracking_uri
from tasks.training import (FIT, FRESH, SAMPLE, SCORE, build_family, derive_seed, fit_model_task, fresh_real_rows,
                            load_model, make_next_dataset_task, resolve_device, sample_synthetic_task,
                            synthetic_rows)
from tasks.versioning import dvc_add

log_generation_task = as_task(log_generation, retries=2)
dvc_add_task = as_task(dvc_add, retries=2)


def score_model(scorer, model, seed: int) -> tuple[Any, dict[str, float]]:
    """Model k's samples (for its picture) and metrics, from the scorer of the family's kind."""
    return scorer.evaluate(model, seed)


score_model_task = as_task(score_model)


@flow(name="lineage", flow_run_name="{lineage}", log_prints=False)
def lineage_loop(params: dict[str, Any], lineage: str, root: str = ".") -> list[dict[str, Any]]:
    """Run (or resume) one lineage for ``loop.generations`` generations; return its per-generation metrics."""
    logger = get_run_logger()
    p = validate(params)
    paths = StudyPaths(Path(root).resolve(), p.study.name)
    spec = p.lineage(lineage)
    device = resolve_device(p.device)
    generations = p.loop.generations

    real = prepare_real_data_task(p, paths)
    scorer, scorer_note = build_scorer_task(p, real, paths.cache, device)
    family = build_family(p, real.train.shape)
    recipe, score_hash = lineage_recipe(p, spec), digest(score_recipe(p))
    folder = paths.lineage(spec.name)

    state = inspect_lineage(folder, recipe, real_train_sha(paths))
    if state.stale:
        raise StaleOutputsError(f"{folder} holds generations made under other params: " + "; ".join(state.stale))
    if state.corrupt:
        moved = quarantine_from(paths, folder, state.next_generation)
        logger.warning(f"{state.corrupt}: not used; generation {state.next_generation} and later are redone "
                       f"(old files moved to {moved})")
    start = min(state.next_generation, generations)
    if start:
        logger.info(f"[{spec.name}] resuming: generations 0-{start - 1} are finished and verified")

    uri = tracking_uri(p.tracking.uri, paths.root)
    seed = lineage_seed(p, spec)
    mode, real_fraction = lineage_mode(p, spec)
    tags = {"lineage": spec.name, "estimator": spec.estimator, "loop_mode": mode, "mitigation": spec.mitigation,
            "recipe": spec.group or spec.name,
            "data_source": p.data.source, "seed": str(seed), "study": p.study.name, "model_family": family.name,
            "scorer": scorer_note}
    run_name = spec.name if p.experiment == p.study.name else f"{p.study.name}/{spec.name}"
    exp_id, parent_id = open_lineage(uri, p.experiment, spec.name, digest(recipe), tags, paths.root, run_name=run_name)
    run_params = {k: v for k, v in flatten(recipe).items()}

    manifests = []
    for manifest in state.finished[:generations]:
        if manifest.get("score_hash") != score_hash:  # scoring params changed: rescore the stored model
            k = manifest["generation"]
            model = load_model(family, load_generation_model(folder, k), device)
            _, metrics = score_model_task(scorer, model, derive_seed(seed, k, SCORE))
            kept = {key: manifest["metrics"][key] for key in ("minority_share_train",) if key in manifest["metrics"]}
            manifest = rescore_manifest(folder, manifest, {**metrics, **kept}, score_hash)
        log_generation_task(uri, exp_id, parent_id, spec.name, manifest, folder, paths.root, run_params)
        manifests.append(manifest)

    dataset = real.train if start == 0 else load_generation_dataset(folder, start)
    trained_on_path = paths.real / "train.parquet" if start == 0 else folder / f"dataset-{start:03d}.parquet"
    n_synthetic = synthetic_rows(mode, len(real.train), p.loop.synthetic_size, real_fraction)
    truth = family if family.kind == "scalar" else None
    reference = None
    if spec.mitigation == "importance":
        reference = reference_set(real.train_full, [p.data.majority, p.data.minority],
                                  p.mitigation.reference_per_class, p.seed)
    first_metrics = state.finished[0]["metrics"] if state.finished else None
    try:
        for k in range(start, generations):
            weights, weight_info = training_weights(spec.mitigation, scorer, dataset, reference,
                                                    max_ece=p.mitigation.max_ece,
                                                    weight_clip=p.mitigation.weight_clip, seed=seed + k)
            model = fit_model_task(family, spec.estimator, dataset, p, derive_seed(seed, k, FIT), device, weights)
            synthetic = sample_synthetic_task(model, n_synthetic, derive_seed(seed, k, SAMPLE), spec.name, k + 1,
                                              p.data.source, p.loop.temperature)
            samples, metrics = score_model_task(scorer, model, derive_seed(seed, k, SCORE))
            metrics.update(scorer.dataset_metrics(dataset), **weight_info)
            first_metrics = first_metrics or metrics
            if spec.mitigation == "dynamic_ratio":
                shares = dynamic_shares(real_fraction, first_metrics, metrics)
                next_dataset = dynamic_next_dataset(real.train, synthetic, shares,
                                                    {"majority": p.data.majority, "minority": p.data.minority},
                                                    derive_seed(seed, k, FRESH))
                metrics.update({f"real_share_{g}": v for g, v in shares.items()})
            else:
                fresh = fresh_real_rows(real.train, round(n_synthetic * real_fraction / (1 - real_fraction)),
                                        derive_seed(seed, k, FRESH), truth) if mode == "fresh" else None
                next_dataset = make_next_dataset_task(mode, real.train, dataset, synthetic, fresh)
            trained_on = {"path": str(trained_on_path.relative_to(paths.root)),
                          "sha256": file_digest(trained_on_path), "md5": file_digest(trained_on_path, "md5")}
            manifest = save_generation_task(folder, k, model.tensors(), next_dataset,
                                            lambda path, s=samples: scorer.picture(s, path), metrics, recipe,
                                            score_hash, trained_on, {**model.info, "rows_trained_on": len(dataset)})
            log_generation_task(uri, exp_id, parent_id, spec.name, manifest, folder, paths.root, run_params)
            if p.dvc.track:
                dvc_add_task(paths.root, [folder])
            logger.info(f"[{spec.name}] generation {k + 1}/{generations}: {scorer.describe(metrics)}  "
                        f"fit {model.info.get('fit_seconds', 0.0):.1f}s")
            manifests.append(manifest)
            dataset, trained_on_path = next_dataset, folder / f"dataset-{k + 1:03d}.parquet"
    except BaseException as err:
        close_lineage(uri, parent_id, "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if p.dvc.track and start == generations and manifests:
        dvc_add_task(paths.root, [folder])  # nothing new, but make sure a resumed lineage is tracked
    close_lineage(uri, parent_id)
    return [{"lineage": spec.name, "generation": m["generation"], **m["metrics"]} for m in manifests]


@flow(name="self_consuming_loop", log_prints=False)
def self_consuming_loop(params: dict[str, Any] | None = None, root: str = ".", lineages: list[str] | None = None,
                        overwrite: bool = False, lineage_deployment: str | None = None) -> list[dict[str, Any]]:
    """A study: every lineage in params (or the named ones) over the same real data and test split.

    Lineages run here, one after another, as subflows. With ``lineage_deployment`` ("lineage/gpu") each one runs
    as its own flow run of that deployment instead, all at once, on the workers of its work pool (flows.deploy).
    """
    logger = get_run_logger()
    p = validate(params)
    plan = preflight(p, Path(root), lineages, overwrite)
    paths = plan.paths
    device = resolve_device(p.device)
    real = prepare_real_data_task(p, paths)
    _, scorer_note = build_scorer_task(p, real, paths.cache, device)
    what = (f"classes {p.data.majority}/{p.data.minority} (R_I = {p.data.imbalance_ratio:g})"
            if p.data.source != "model" else f"draws of the {p.model.family} truth")
    logger.info(f"study {p.study.name!r}: {len(real.train)} real training rows of {p.data.source}, {what}; "
                f"{scorer_note}; device {device}")
    if p.dvc.track:
        dvc_add_task(paths.root, [paths.real])
    if lineage_deployment:
        from flows.deploy import fan_out

        fan_out(lineage_deployment, p, [spec.name for spec in plan.lineages], paths.root)
    else:
        # In-process lineages send no heartbeats of their own: the study's flow run, in the same process, already
        # does (a crash stops both), and joining each one's heartbeat thread, which sleeps in 1 s steps, held up
        # the end of its lineage by up to 1 s (docs/performance.md).
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for spec in plan.lineages:
                lineage_loop(params=p.model_dump(mode="json"), lineage=spec.name, root=str(paths.root))
    return write_reports_task(p, paths, p.lineages)


def run_study(p: Params, root: Path, lineages: list[str] | None = None, overwrite: bool = False):
    """Validate against the world first (no Prefect run is started for bad input), then run the flow."""
    preflight(p, root, lineages, overwrite)
    return self_consuming_loop(params=p.model_dump(mode="json"), root=str(root), lineages=lineages,
                               overwrite=False)
