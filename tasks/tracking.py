"""MLflow: one experiment per study, a parent run per lineage, a nested run per generation.

Parent runs carry every metric at step = generation, so the MLflow UI overlays lineages. Nested runs carry
the generation's params, the DVC path and md5 of the dataset it trained on and of the one it produced (the
link back to DVC), a PNG grid of samples and the model weights (safetensors).

Recording is idempotent: a generation whose nested run already finished is not logged again, so resuming a
killed study never duplicates runs, and a call retried after a "database is locked" error (lineages running in
parallel processes share one sqlite store) does not either. A generation re-scored under other score params
replaces its nested run and logs its new scores on the parent (the latest value at a step is what MLflow shows).

Parent runs carry the host and pid of the process running them, so a later run of the study marks the runs of a
dead process KILLED instead of leaving them RUNNING forever (:func:`mark_dead_runs`). Studies that share an
experiment (``tracking.experiment``) are kept apart: a lineage's parent run is found by lineage, recipe and study.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

LINEAGE_TAG, RECIPE_TAG, GENERATION_TAG = "madloop.lineage", "madloop.recipe", "madloop.generation"
SCORE_TAG, HOST_TAG, PID_TAG = "madloop.score_hash", "madloop.host", "madloop.pid"
MAX_PARAMS_PER_BATCH = 100
LOCKED_ATTEMPTS = 8
F = TypeVar("F", bound=Callable[..., Any])


def tracking_uri(configured: str, project_root: Path) -> str:
    """MLFLOW_TRACKING_URI wins over params; a relative sqlite path is anchored at the project root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((project_root / uri[len(prefix):]).resolve())
    return uri


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str, project_root: Path) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    local = client.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in client.tracking_uri
    location = (project_root / "mlruns").resolve().as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a parallel run
        return client.get_experiment_by_name(name).experiment_id


def find_runs(client: MlflowClient, exp_id: str, filter_string: str) -> list:
    return client.search_runs([exp_id], filter_string=filter_string, max_results=1000)


def lineage_run(client: MlflowClient, exp_id: str, lineage: str, recipe: str, tags: dict[str, str],
                run_name: str | None = None) -> str:
    """The parent run of this lineage and recipe in this study: reused when it exists (resume), created otherwise."""
    study = f" and tags.study = '{tags['study']}'" if "study" in tags else ""
    runs = [r for r in find_runs(client, exp_id, f"tags.`{LINEAGE_TAG}` = '{lineage}' and "
                                                  f"tags.`{RECIPE_TAG}` = '{recipe}'{study}")
            if not r.data.tags.get("mlflow.parentRunId")]
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in owner.items():
            client.set_tag(run_id, key, value)
        return run_id
    run = client.create_run(exp_id, run_name=run_name or lineage,
                            tags={LINEAGE_TAG: lineage, RECIPE_TAG: recipe, **tags, **owner})
    return run.info.run_id


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_dead_runs(uri: str, experiment: str, study: str) -> int:
    """Mark KILLED the RUNNING lineage runs of ``study`` (and their RUNNING generation runs) whose process, on this
    machine, is gone; runs of other machines are left to theirs. Returns how many were marked."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    here, marked = socket.gethostname(), 0
    for run in find_runs(client, exp.experiment_id, f"tags.study = '{study}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("mlflow.parentRunId") or tags.get(HOST_TAG, here) != here:
            continue
        pid = int(tags.get(PID_TAG, 0) or 0)
        if pid == os.getpid() or (pid and process_alive(pid)):
            continue
        children = find_runs(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                                        "attributes.status = 'RUNNING'")
        for stale in [*children, run]:
            client.set_terminated(stale.info.run_id, "KILLED")
            marked += 1
    return marked


def retire_lineage_runs(client: MlflowClient, exp_id: str, study: str, lineage: str) -> int:
    """Soft-delete a lineage's runs, parents and their generations (restorable with ``mlflow runs restore``),
    when its outputs are replaced."""
    parents = find_runs(client, exp_id, f"tags.`{LINEAGE_TAG}` = '{lineage}' and tags.study = '{study}'")
    runs = [*parents, *(child for parent in parents for child in
                        find_runs(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))]
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)


def as_floats(metrics: dict[str, float]) -> dict[str, float]:
    """Every metric as a float; undefined ones (None) become NaN, which MLflow stores and charts as a gap."""
    return {k: math.nan if v is None else float(v) for k, v in metrics.items()}


def training_metrics(info: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) of what the fit reported: its scalar summaries (step 0) and, for estimators that keep
    one (the hypernetworks), the per-epoch history (step = epoch): how much of the loss the penalty is."""
    out = [(f"train.{k}", float(v), 0) for k, v in info.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rows_trained_on"]
    for name, values in (info.get("history") or {}).items():
        out += [(f"train.{name}_per_epoch", float(v), epoch) for epoch, v in enumerate(values)
                if v is not None and math.isfinite(v)]
    return out


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def record_generation(client: MlflowClient, exp_id: str, parent_id: str, lineage: str, generation: int,
                      metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
                      artifacts: list[Path], training: list[tuple[str, float, int]] = ()) -> str:
    """Log generation k once per score: a nested run with params, tags, artifacts and the fit's own metrics
    (``training``: (name, value, step)), and the scores at step k on both it and the lineage's parent run. A nested
    run of other scores (``tags[SCORE_TAG]``: the generation was re-scored) is replaced."""
    values = as_floats(metrics)  # FID of a class with no samples is NaN: logged, so every step has every metric
    run_id = None
    for run in find_runs(client, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                         f"tags.`{GENERATION_TAG}` = '{generation}'"):
        current = run.data.tags.get(SCORE_TAG) == tags.get(SCORE_TAG)
        if run.info.status == "FINISHED" and current and run_id is None:
            run_id = run.info.run_id
        else:
            client.delete_run(run.info.run_id)  # a half-logged attempt of a killed run, or of the old scores
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=f"{lineage}-gen{generation:03d}",
                                   tags={"mlflow.parentRunId": parent_id, LINEAGE_TAG: lineage,
                                         GENERATION_TAG: str(generation), **tags}).info.run_id
        now = int(time.time() * 1000)
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])
        client.log_batch(run_id, metrics=[Metric(k, v, now, generation) for k, v in values.items()])
        fitted = [Metric(k, v, now, step) for k, v, step in training]
        for start in range(0, len(fitted), 1000):
            client.log_batch(run_id, metrics=fitted[start:start + 1000])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
    # The parent's curve gets step k once per score, even when a killed run got this far before: the last value
    # logged at step k is compared (a re-scored generation logs its new scores, which MLflow then shows).
    latest: dict[str, float] = {}
    for key in values:
        for m in sorted(client.get_metric_history(parent_id, key), key=lambda m: m.timestamp):
            if m.step == generation:
                latest[key] = m.value
    stale = {k: v for k, v in values.items() if k not in latest or not same(latest[k], v)}
    if stale:
        now = int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[Metric(k, v, now, generation) for k, v in stale.items()])
    client.set_tag(parent_id, "madloop.generations_done", str(max(generation + 1, 1)))
    return run_id


def finish_lineage(client: MlflowClient, parent_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(parent_id, status)


def retry_when_locked(fn: F) -> F:
    """Retry ``fn`` while a sqlite store is locked by another writer. MLflow waits 20 s for the lock
    (busy_timeout), but sqlite fails at once when two transactions deadlock on upgrading their locks; parallel
    lineages then retry after a short, growing pause. Needs idempotent calls, which the ones below are."""

    @functools.wraps(fn)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(LOCKED_ATTEMPTS - 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if "database is locked" not in str(err):
                    raise
            time.sleep(min(0.1 * 2 ** attempt, 5.0))
        return fn(*args, **kwargs)

    return retrying  # type: ignore[return-value]


# --- the calls the flow makes ---------------------------------------------------------------------------------


@retry_when_locked
def open_lineage(uri: str, experiment: str, lineage: str, recipe_hash: str, tags: dict[str, str],
                 project_root: Path, run_name: str | None = None) -> tuple[str, str]:
    """(experiment id, parent run id) for a lineage: the study's experiment, the lineage's parent run."""
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, project_root)
    return exp_id, lineage_run(client, exp_id, lineage, recipe_hash, tags, run_name)


@retry_when_locked
def log_generation(uri: str, exp_id: str, parent_id: str, lineage: str, manifest: dict[str, Any],
                   folder: Path, project_root: Path, params: dict[str, Any]) -> str:
    """Record one finished generation from its manifest (so a resumed run can record it again, exactly)."""
    k = manifest["generation"]
    produced = folder / next(name for name in manifest["outputs"] if name.endswith(".parquet"))
    model = folder / next(name for name in manifest["outputs"] if name.endswith(".safetensors"))
    grid = [folder / name for name in manifest["outputs"] if name.endswith(".png")]
    trained_on = manifest["trained_on"]
    tags = {
        "dvc.trained_on.path": trained_on["path"], "dvc.trained_on.md5": trained_on["md5"],
        "dvc.produced.path": str(produced.relative_to(project_root)),
        "dvc.produced.md5": manifest["md5"][produced.name],
        "madloop.manifest": str((folder / f"gen-{k:03d}.json").relative_to(project_root)),
        SCORE_TAG: manifest.get("score_hash", ""),
    }
    return record_generation(client_for(uri), exp_id, parent_id, lineage, k, manifest["metrics"],
                             {**params, "generation": k}, tags, [*grid, model], training_metrics(manifest["info"]))


@retry_when_locked
def close_lineage(uri: str, parent_id: str, status: str = "FINISHED") -> None:
    finish_lineage(client_for(uri), parent_id, status)


def log_study_run(uri: str, experiment: str, run_name: str, project_root: Path, params: dict[str, Any],
                  curves: dict[str, list[tuple[int, float]]], tags: dict[str, str],
                  artifacts: list[Path] = ()) -> str:
    """One finished run of a paper study: params, metric curves (step -> value) and artifacts."""
    client = client_for(uri)
    exp_id = experiment_id(client, experiment, project_root)
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])
    metrics = [Metric(name, float(value), now, int(step)) for name, points in curves.items() for step, value in points]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id
