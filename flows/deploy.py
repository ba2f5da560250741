"""Scheduled runs and scale-out: the study as Prefect deployments, its lineages fanned out to a work pool.

Two flows are deployed (``prefect.yaml``, ``madloop serve``; set-up in docs/scale-out.md):

- ``scheduled-study`` reads its params (a file plus ``--set`` overrides) when each run starts, so a schedule
  follows params.yaml as committed, like ``madloop run`` and ``dvc repro`` do. It prepares the real data and the
  domain classifier once, then runs the lineages and writes the reports.
- ``lineage`` (``flows.loop.lineage_loop``) is one lineage. When the study is given a ``lineage_deployment``, each
  lineage becomes its own flow run of that deployment, and the workers of its work pool (one per GPU) run them in
  parallel (``flows.fanout``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType

from flows.fanout import prepare_fan_out
from flows.loop import lineage_loop, self_consuming_loop
from tasks.params import Params, ParamsError, load
from tasks.resume import StaleOutputsError, check_names, preflight

SERVED_LINEAGES = "lineage/served"  # the lineage deployment `madloop serve --fan-out` serves itself


def scheduled_run_name() -> str:
    """A scheduled run's name, ``study default (nightly, 2026-12-05 03:00 UTC)``, not a random one: the study named
    in its params file (read again when the run starts; ``study`` alone when it cannot be read), its deployment
    and when it was due."""
    from prefect.runtime import deployment, flow_run

    parameters = flow_run.parameters
    try:
        params_file = parameters.get("params_file")
        path = None if params_file is None else Path(parameters.get("root") or ".").resolve() / params_file
        study = f"study {load(path, parameters.get('overrides') or []).study.name}"
    except Exception:  # the run itself reports bad params; its name is no place for that
        study = "study"
    due = flow_run.scheduled_start_time
    return f"{study} ({deployment.name or 'scheduled'}, {due:%Y-%m-%d %H:%M} UTC)" if due else study


@flow(name="scheduled-study", flow_run_name=scheduled_run_name, log_prints=False)
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
                fan_out_to: str | None = None, name: str | None = None, paper_studies: Sequence[str] = ()) -> None:
    """Serve the study on a schedule until interrupted (``madloop serve``); with ``fan_out_to`` = SERVED_LINEAGES
    this process also serves the lineage flow, so the lineages of each run are parallel processes here."""
    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise ParamsError("madloop serve needs a Prefect server with its scheduler (a temporary one has none): "
                          "run `prefect server start` elsewhere, then "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    if interval is not None and interval <= 0:
        raise ParamsError(f"--interval: expected a positive number of seconds (got {interval:g})")
    check_names(p, root, paper_studies)
    try:  # bad params, a missing DVC repo or stale outputs fail now, not at 3 a.m.
        plan = preflight(p, root, lineages)
    except StaleOutputsError as err:
        raise StaleOutputsError(f"{err}\n(scheduled runs never overwrite: run `madloop run --overwrite` once, "
                                "then serve)") from None
    deployments = [study_deployment(name or p.study.name, params_file, overrides, root, lineages, fan_out_to,
                                    cron, interval)]
    if fan_out_to == SERVED_LINEAGES:
        deployments.append(lineage_loop.to_deployment(name=SERVED_LINEAGES.split("/")[1], tags=["madloop"],
                                                      entrypoint_type=EntrypointType.MODULE_PATH))
    elif fan_out_to is not None:  # a lineage deployment, or a Slurm pool (then each lineage is a Slurm job)
        prepare_fan_out(fan_out_to, p, [spec.name for spec in plan.lineages])
    serve(*deployments)
