"""Scheduled runs and scale-out: the study as Prefect deployments, its lineages fanned out to a work pool.

Two flows are deployed (``prefect.yaml``, ``madloop serve``; set-up in docs/scale-out.md):

- ``scheduled-study`` reads its params (a file plus ``--set`` overrides) when each run starts, so a schedule
  follows params.yaml as committed, like ``madloop run`` and ``dvc repro`` do. It prepares the real data and the
  domain classifier once, then runs the lineages and writes the reports.
- ``lineage`` (``flows.loop.lineage_loop``) is one lineage. When the study is given a ``lineage_deployment``, each
  lineage becomes its own flow run of that deployment, and the workers of its work pool (one per GPU) run them in
  parallel.

Why flow runs on a work pool rather than tasks on a Dask or Ray task runner: a lineage is minutes to hours of
GPU work that owns its folder and its MLflow run. As a flow run it gets its own process (its own CUDA context and
memory), its own state, logs, retries and cancel button, can be re-run alone, and lands on whichever GPU worker
is free, on any machine that polls the pool. A task runner would keep every lineage inside the study's process
and cluster, and add a second scheduler beside Prefect's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, serve, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments import run_deployment
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType

from flows.loop import lineage_loop, self_consuming_loop
from tasks.params import Params, ParamsError, load
from tasks.study import StaleOutputsError, preflight
from tasks.tracking import client_for, experiment_id, tracking_uri

SERVED_LINEAGES = "lineage/served"  # the lineage deployment `madloop serve --fan-out` serves itself
POLL_SECONDS = 2.0  # how often the study checks on its lineage runs (each lasts minutes)


class LineageRunError(RuntimeError):
    """A lineage submitted to a deployment did not complete."""


@flow(name="scheduled-study", log_prints=False)
def scheduled_study(params_file: str | None = "params.yaml", overrides: list[str] | None = None, root: str = ".",
                    lineages: list[str] | None = None, lineage_deployment: str | None = None,
                    overwrite: bool = False) -> list[dict[str, Any]]:
    """Run the study in ``params_file`` (relative to ``root``; None: built-in defaults) with ``overrides``
    ("key=value", as ``--set``), reading them when the run starts; the study runs inside this flow run."""
    project = Path(root).resolve()
    path = None if params_file is None else project / params_file
    p = load(path, overrides or [])
    return self_consuming_loop.fn(params=p.model_dump(mode="json"), root=str(project), lineages=lineages,
                                  overwrite=overwrite, lineage_deployment=lineage_deployment)


# --- fan-out: one flow run per lineage --------------------------------------------------------------------------


@task(name="run-lineage-deployment", cache_policy=NO_CACHE, persist_result=False)
def run_lineage_deployment(deployment: str, params: dict[str, Any], lineage: str, root: str) -> str:
    """Submit one lineage as a flow run of ``deployment`` (linked to the study's run) and wait until it ends."""
    run = run_deployment(deployment, parameters={"params": params, "lineage": lineage, "root": root},
                         flow_run_name=lineage, poll_interval=POLL_SECONDS)
    if run.state is None or not run.state.is_completed():
        state = f"{run.state.name}: {run.state.message}" if run.state else "without a state"
        raise LineageRunError(f"lineage {lineage!r} (flow run {run.name!r} of {deployment}) ended {state}")
    return str(run.id)


def fan_out(deployment: str, p: Params, lineages: list[str], root: Path) -> None:
    """Run every lineage as its own flow run of ``deployment``, all at once; wait for all, then fail if any did.

    Safe with parallel writers: each lineage writes only its own folder and MLflow parent run; ``dvc add`` is
    serialized per machine (tasks.versioning) and by DVC's repository lock across machines; the MLflow store is
    created here first, so the lineages' processes never race to create its tables or the study's experiment.
    """
    check_deployment(deployment)
    experiment_id(client_for(tracking_uri(p.tracking.uri, root)), p.experiment, root)
    futures = run_lineage_deployment.map(deployment, unmapped(p.model_dump(mode="json")), lineages, str(root))
    futures.wait()
    failed = [f"{name}: {future.state.message}" for name, future in zip(lineages, futures)
              if not future.state.is_completed()]
    if failed:
        raise LineageRunError(f"{len(failed)} of {len(lineages)} lineages failed: " + "; ".join(failed))


def check_deployment(name: str) -> None:
    """Fail with a useful message, before any work, when the lineage deployment is not on the Prefect server."""
    if name.count("/") != 1:
        raise ParamsError(f"lineage deployment {name!r}: expected 'flow/deployment', e.g. 'lineage/gpu'")
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ParamsError(f"no deployment {name!r} on the Prefect server: register it with `prefect deploy "
                              f"--all` (prefect.yaml) or serve it with `madloop serve --fan-out`") from None
        flow_name = client.read_flow(deployment.flow_id).name
    if flow_name != lineage_loop.name:
        raise ParamsError(f"deployment {name!r} runs flow {flow_name!r}, not {lineage_loop.name!r}")


# --- madloop serve ----------------------------------------------------------------------------------------------


def study_deployment(name: str, params_file: Path | None, overrides: list[str], root: Path,
                     lineages: list[str] | None, lineage_deployment: str | None,
                     cron: str | None = None, interval: float | None = None) -> RunnerDeployment:
    """The scheduled study as a deployment to serve. One run at a time, as two runs of one study would write the
    same lineage folders: a run that comes due while the last one still runs is cancelled (CANCEL_NEW); the
    running one is already doing that work, since every run resumes where the last one stopped."""
    parameters = {"params_file": None if params_file is None else str(params_file.resolve()),
                  "overrides": list(overrides), "root": str(root), "lineages": lineages,
                  "lineage_deployment": lineage_deployment}
    try:
        return scheduled_study.to_deployment(
            name=name, schedules=[Cron(cron, timezone="UTC") if cron else Interval(interval)], parameters=parameters,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            entrypoint_type=EntrypointType.MODULE_PATH, tags=["madloop"])
    except ValueError as err:  # an invalid cron expression (a pydantic error: its first message says it all)
        reason = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise ParamsError(f"schedule: {reason.removeprefix('Value error, ')}") from None


def serve_study(p: Params, params_file: Path | None, overrides: list[str], root: Path, *,
                cron: str | None = None, interval: float | None = None, lineages: list[str] | None = None,
                fan_out_to: str | None = None, name: str | None = None) -> None:
    """Serve the study on a schedule until interrupted (``madloop serve``); with ``fan_out_to`` = SERVED_LINEAGES
    this process also serves the lineage flow, so the lineages of each run are parallel processes here."""
    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise ParamsError("madloop serve needs a Prefect server with its scheduler (a temporary one has none): "
                          "run `prefect server start` elsewhere, then "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    if interval is not None and interval <= 0:
        raise ParamsError(f"--interval: expected a positive number of seconds (got {interval:g})")
    try:  # bad params, a missing DVC repo or stale outputs fail now, not at 3 a.m.
        preflight(p, root, lineages)
    except StaleOutputsError as err:
        raise StaleOutputsError(f"{err}\n(scheduled runs never overwrite: run `madloop run --overwrite` once, "
                                "then serve)") from None
    deployments = [study_deployment(name or p.study.name, params_file, overrides, root, lineages, fan_out_to,
                                    cron, interval)]
    if fan_out_to == SERVED_LINEAGES:
        deployments.append(lineage_loop.to_deployment(name=SERVED_LINEAGES.split("/")[1], tags=["madloop"],
                                                      entrypoint_type=EntrypointType.MODULE_PATH))
    elif fan_out_to is not None:
        check_deployment(fan_out_to)
    serve(*deployments)
