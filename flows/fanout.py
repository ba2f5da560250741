"""Fan-out: each lineage of a study as its own flow run of a lineage deployment, on the workers of its pool.

Why flow runs on a work pool rather than tasks on a Dask or Ray task runner: a lineage is minutes to hours of
GPU work that owns its folder and its MLflow run. As a flow run it gets its own process (its own CUDA context and
memory), its own state, logs, retries and cancel button, can be re-run alone, and lands on whichever GPU worker
is free, on any machine that polls the pool. A task runner would keep every lineage inside the study's process
and cluster, and add a second scheduler beside Prefect's.

A target is a lineage deployment (``lineage/gpu``: its pool's workers run the lineages) or, without a slash, a
Slurm work pool (``slurm``: flows.slurm; the pool and its ``lineage/slurm`` deployment are registered when missing).
A lineage on a Slurm pool is a Slurm job with the resources of its ``slurm`` params, and the study runs a Slurm
worker itself while it waits, so nothing but a Prefect server has to be started first.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from flows.slurm import WORKER_TYPE, ensure_lineage_deployment, ensure_pool, pool_type, worker_while
from tasks.params import Params, ParamsError, lineage_params
from tasks.slurm import SlurmParams, SlurmUnfit, loopback_problem
from tasks.slurm import check as check_resources
from tasks.tracking import client_for, experiment_id, tracking_uri

LINEAGE_FLOW = "lineage"  # the name of flows.loop.lineage_loop, which lineage deployments must run
POLL_SECONDS = 2.0  # how often the study checks on its lineage runs (each lasts minutes)


class LineageRunError(RuntimeError):
    """A lineage submitted to a deployment did not complete."""


@dataclass(frozen=True)
class FanOut:
    """Where a study's lineages go: a lineage deployment, its work pool, and whether that pool is Slurm's."""

    deployment: str
    pool: str | None
    slurm: bool = False

    def job_variables(self, p: Params, lineages: list[str], root: Path) -> list[dict[str, Any]]:
        """Per lineage: on a Slurm pool, its job's resources (its ``slurm`` params) and working directory."""
        if not self.slurm:
            return [{} for _ in lineages]
        settings = lineage_settings(p, lineages)
        return [{**settings[name].model_dump(mode="json"), "working_dir": str(root)} for name in lineages]


def lineage_settings(p: Params, lineages: list[str]) -> dict[str, SlurmParams]:
    """Each lineage's Slurm job: the study's ``slurm`` section with the lineage's own ``set`` on top."""
    return {name: lineage_params(p, p.lineage(name)).slurm for name in lineages}


def check_slurm(p: Params, lineages: list[str], target: str) -> None:
    try:
        check_resources(lineage_settings(p, lineages), p.slurm, target)
    except SlurmUnfit as err:
        raise ParamsError(str(err)) from None


def check_target(target: str, p: Params, lineages: list[str]) -> None:
    """What can be checked before a Prefect server is reached: a Slurm pool's controller and resources."""
    if "/" not in target:
        check_slurm(p, lineages, target)


def prepare_fan_out(target: str, p: Params, lineages: list[str]) -> FanOut:
    """Check the target before any work (ParamsError naming what is wrong), registering a Slurm pool's pool and
    lineage deployment when missing."""
    if "/" not in target:  # a Slurm work pool
        if not target or target.strip() != target:
            raise ParamsError(f"--fan-out {target!r}: expected a lineage deployment ('lineage/gpu') or a Slurm "
                              "work pool ('slurm')")
        check_slurm(p, lineages, target)
        try:
            ensure_pool(target)
        except SlurmUnfit as err:  # a pool of another type
            raise ParamsError(str(err)) from None
        target = FanOut(ensure_lineage_deployment(target, LINEAGE_FLOW), target, slurm=True)
    else:
        pool = check_deployment(target)
        slurm = pool is not None and pool_type(pool) == WORKER_TYPE
        if slurm:
            check_slurm(p, lineages, pool)
        target = FanOut(target, pool, slurm)
    if target.slurm:
        problem = loopback_problem(PREFECT_API_URL.value(), target.pool)
        if problem:
            raise ParamsError(problem)
    return target


@task(name="run-lineage-deployment", task_run_name="run-lineage-deployment [{lineage}]", cache_policy=NO_CACHE,
      persist_result=False)
def run_lineage_deployment(deployment: str, params: dict[str, Any], lineage: str, root: str,
                           job_variables: dict[str, Any] | None = None) -> str:
    """Submit one lineage as a flow run of ``deployment`` (linked to the study's run) and wait until it ends."""
    study = (params.get("study") or {}).get("name", "default")
    run = run_deployment(deployment, parameters={"params": params, "lineage": lineage, "root": root},
                         flow_run_name=f"{study}/{lineage}", poll_interval=POLL_SECONDS,
                         tags=["madloop", f"study:{study}", f"lineage:{lineage}"], job_variables=job_variables or None)
    if run.state is None or not run.state.is_completed():
        state = f"{run.state.name}: {run.state.message}" if run.state else "without a state"
        job = f", Slurm job {run.infrastructure_pid}" if job_variables and run.infrastructure_pid else ""
        raise LineageRunError(f"lineage {lineage!r} (flow run {run.name!r} of {deployment}{job}) ended {state}")
    return str(run.id)


def fan_out(target: FanOut, p: Params, lineages: list[str], root: Path) -> None:
    """Run every lineage as its own flow run of the target's deployment, all at once; wait for all, then fail if
    any did.

    Safe with parallel writers: each lineage writes only its own folder and MLflow parent run; ``dvc add`` is
    serialized per machine (tasks.versioning) and by DVC's repository lock across machines; the MLflow store is
    created here first, so the lineages' processes never race to create its tables or the study's experiment.
    """
    if target.pool is not None and not target.slurm and not workers_online(target.pool):
        get_run_logger().warning(
            f"{len(lineages)} lineage(s) wait on work pool {target.pool!r}, which has no worker online: they start "
            f"when one polls it (`prefect worker start --pool {target.pool}`, one per GPU; docs/scale-out.md)")
    experiment_id(client_for(tracking_uri(p.tracking.uri, root)), p.experiment, root)
    with worker_while(target.pool) if target.slurm else nullcontext():
        futures = run_lineage_deployment.map(target.deployment, unmapped(p.model_dump(mode="json")), lineages,
                                             str(root), target.job_variables(p, lineages, root))
        futures.wait()
    failed = [str(future.result(raise_on_failure=False)) for future in futures if not future.state.is_completed()]
    if failed:
        raise LineageRunError(f"{len(failed)} of {len(lineages)} lineages failed: " + "; ".join(failed))


def workers_online(pool: str) -> int:
    """How many workers poll ``pool`` now (Prefect marks a worker offline when its heartbeats stop)."""
    with get_client(sync_client=True) as client:
        return sum(1 for worker in client.read_workers_for_work_pool(pool) if str(worker.status.value) == "ONLINE")


def check_deployment(name: str) -> str | None:
    """Fail with a useful message, before any work, when the lineage deployment is not on the Prefect server;
    return its work pool (None for a served deployment, which needs no worker)."""
    if name.count("/") != 1:
        raise ParamsError(f"lineage deployment {name!r}: expected 'flow/deployment' (e.g. 'lineage/gpu') or a Slurm "
                          "work pool (e.g. 'slurm')")
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ParamsError(f"no deployment {name!r} on the Prefect server: register it with `prefect deploy "
                              f"--all` (prefect.yaml) or serve it with `madloop serve --fan-out`") from None
        flow_name = client.read_flow(deployment.flow_id).name
    if flow_name != LINEAGE_FLOW:
        raise ParamsError(f"deployment {name!r} runs flow {flow_name!r}, not {LINEAGE_FLOW!r}")
    return deployment.work_pool_name
