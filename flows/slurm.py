"""Lineages as Slurm jobs: a Prefect worker whose flow runs are ``sbatch`` jobs, for the clusters researchers have.

A Slurm work pool (type ``madloop-slurm``) holds lineage flow runs like the ``process`` pools of docs/scale-out.md;
its worker, instead of starting a process, submits each run as a batch job that runs Prefect's engine
(``python -m prefect.engine``, the flow run's id in the job's environment), watches the job with ``scontrol``,
and reports a job that ended without its flow run ending (cancelled while queued, killed after its time limit,
pre-empted, a lost node) as Crashed, so the study waiting on it learns at once. A lineage's resources come from
its ``slurm`` params (``tasks.slurm``), passed as the flow run's job variables.

A study that fans out to a Slurm pool runs this worker itself while it waits (``worker_while``): the study's
process submits its own lineages and watches their jobs, so ``madloop run --fan-out slurm`` needs no other
process than a Prefect server. A standing worker (``prefect worker start --pool slurm``, once madloop is
installed: pyproject's ``prefect.collections`` entry point names this module) serves runs started elsewhere, by
hand or from the UI; two workers on one pool never run a flow run twice (claiming one is atomic).

Why madloop's own worker over Prefect's public ``BaseWorker`` API rather than an integration package: see
docs/scale-out.md ("Which Slurm integration"), in short: ``prefect-submitit`` runs tasks, not flow runs, and needs
Python 3.12; ``prefect-slurm`` speaks slurmrestd's REST API v0.0.40+ only (Slurm 23.11+, with JWT tokens), has no
GPU request and installs Prefect into a fresh virtualenv in every job.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import anyio
import anyio.abc
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import InfrastructureNotFound, ObjectNotFound
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL, PREFECT_WORKER_QUERY_SECONDS, temporary_settings
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

from tasks.slurm import (SlurmError, SlurmParams, SlurmUnfit, cancel, job_state, resource_args, submit, thread_env,
                         wait_ended)

WORKER_TYPE = "madloop-slurm"
OUTPUT = ".madloop/slurm/%j.out"  # each job's stdout and stderr, under its working directory (the project)
JOB_POLL_SECONDS = 3.0  # how often the worker asks the controller about each of its jobs
ENDING_SECONDS = 60.0  # how long a study waits for its jobs to exit once their flow runs have ended
QUERY_SECONDS = 2.0  # how often a study's own worker looks for its lineages' flow runs (Prefect's default: 10)
LINEAGE_ENTRYPOINT = "flows.loop.lineage_loop"  # a module path: the job imports the installed madloop
DEFAULTS = SlurmParams()  # the one home of the defaults: tasks.slurm.SlurmParams
logger = get_logger("madloop.slurm")


class SlurmVariables(BaseVariables):
    """A lineage's job, as job variables (the study passes its ``slurm`` params; the defaults are theirs)."""

    partition: Optional[str] = Field(DEFAULTS.partition, description="Slurm partition (none: the default one)")
    cpus: int = Field(DEFAULTS.cpus, description="--cpus-per-task, and the job's OMP_NUM_THREADS")
    memory_gb: float = Field(DEFAULTS.memory_gb, description="--mem, in GB")
    gpus: int = Field(DEFAULTS.gpus, description="--gres=gpu:<gpus>")
    time_minutes: int = Field(DEFAULTS.time_minutes, description="--time, in minutes")
    extra_args: list[str] = Field(default_factory=list, description="more sbatch options, e.g. --account=lab")
    working_dir: Optional[Path] = Field(None, description="the job's working directory (default: the worker's)")


class SlurmJobConfiguration(BaseJobConfiguration):
    partition: Optional[str] = Field(None)
    cpus: int = Field(DEFAULTS.cpus)
    memory_gb: float = Field(DEFAULTS.memory_gb)
    gpus: int = Field(DEFAULTS.gpus)
    time_minutes: int = Field(DEFAULTS.time_minutes)
    extra_args: list[str] = Field(default_factory=list)
    working_dir: Optional[Path] = Field(None)

    def settings(self) -> SlurmParams:
        return SlurmParams(partition=self.partition, cpus=self.cpus, memory_gb=float(self.memory_gb),
                           gpus=self.gpus, time_minutes=self.time_minutes, extra_args=list(self.extra_args))

    def prepare_for_flow_run(self, flow_run, deployment=None, flow=None, work_pool=None, worker_name=None,
                             worker_id=None) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        # The job runs the engine with the worker's own Python: on a cluster, the same environment at the same
        # path on the shared filesystem (docs/scale-out.md).
        if self.command in (None, self._base_flow_run_command()):
            self.command = f"{shlex.quote(sys.executable)} -m prefect.engine"


class SlurmWorkerResult(BaseWorkerResult):
    """A finished job: its exit status and id."""


class SlurmWorker(BaseWorker[SlurmJobConfiguration, SlurmVariables, SlurmWorkerResult]):
    """Submits each flow run of its pool as a Slurm job (``sbatch``), and watches it until it ends."""

    type = WORKER_TYPE
    job_configuration = SlurmJobConfiguration
    job_configuration_variables = SlurmVariables
    _description = "Run each flow run as a Slurm batch job (madloop: one job per lineage)."
    _display_name = "Slurm (madloop)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, Any] = {}  # job id -> flow run id, while the job is queued or running

    async def run(self, flow_run, configuration: SlurmJobConfiguration,
                  task_status: Optional[anyio.abc.TaskStatus] = None) -> SlurmWorkerResult:
        run_logger = self.get_flow_run_logger(flow_run)
        settings = configuration.settings()
        working_dir = (configuration.working_dir or Path.cwd()).resolve()
        env = {**os.environ, **{k: v for k, v in configuration.env.items() if v is not None}}
        env.update(thread_env(settings, env))
        job = await anyio.to_thread.run_sync(partial(
            submit, settings, configuration.command, name=configuration.name or flow_run.name,
            working_dir=working_dir, output=OUTPUT, env=env))
        self.jobs[job] = flow_run.id
        run_logger.info(f"Slurm job {job}: {' '.join(resource_args(settings))}; its output: "
                        f"{working_dir / OUTPUT.replace('%j', job)}")
        if task_status is not None:
            task_status.started(job)
        try:
            state = await self.wait_for(job)
        finally:
            self.jobs.pop(job, None)
        if state is None or state.state != "COMPLETED":
            await self.crash_unless_final(
                flow_run, state.describe(job) if state else f"Slurm job {job} ended (the controller forgot it)")
        # The flow run's state now says how the job ended; a non-zero status here would only add Prefect's
        # generic advice about pods and ECS tasks to the log.
        return SlurmWorkerResult(status_code=0, identifier=job)

    async def wait_for(self, job: str):
        while True:
            try:
                state = await anyio.to_thread.run_sync(job_state, job)
            except SlurmError as err:  # the controller is busy or restarting: ask again
                self._logger.warning(f"Slurm job {job}: {err}")
                state = None
            else:
                if state is None or state.ended:
                    return state
            await anyio.sleep(JOB_POLL_SECONDS)

    async def crash_unless_final(self, flow_run, message: str) -> None:
        """A job that ended without its flow run ending (killed while queued, or before the engine could report):
        Crashed, with the job's state as the message, so whoever waits on the run learns why."""
        current = await self.client.read_flow_run(flow_run.id)
        if current.state is None or not current.state.is_final():
            await self._propose_crashed_state(current, message)
        else:
            self.get_flow_run_logger(flow_run).info(f"{message}; flow run {current.state.name}")

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: SlurmJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        state = await anyio.to_thread.run_sync(job_state, infrastructure_pid)
        if state is None or state.ended:
            raise InfrastructureNotFound(f"Slurm job {infrastructure_pid} is not queued or running")
        await anyio.to_thread.run_sync(cancel, infrastructure_pid)


# --- the pool, the lineage deployment, and a study's own worker ------------------------------------------------


def pool_type(pool: str) -> str | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except ObjectNotFound:
            return None


def ensure_pool(pool: str) -> None:
    """The Slurm work pool ``pool``, created (with this worker's job template) when missing."""
    kind = pool_type(pool)
    if kind is None:
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=pool, type=WORKER_TYPE,
                                                   base_job_template=SlurmWorker.get_default_base_job_template()))
    elif kind != WORKER_TYPE:
        raise SlurmUnfit(f"--fan-out {pool}: work pool {pool!r} is a {kind!r} pool, not a Slurm pool "
                          f"({WORKER_TYPE}): name a lineage deployment instead (e.g. lineage/{pool})")


def ensure_lineage_deployment(pool: str, flow_name: str) -> str:
    """``<flow>/<pool>``: the lineage flow as a deployment on ``pool`` (registered when missing; one from
    prefect.yaml is used as it is)."""
    name = f"{flow_name}/{pool}"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            client.create_deployment(flow_id=client.create_flow_from_name(flow_name), name=pool,
                                     entrypoint=LINEAGE_ENTRYPOINT, work_pool_name=pool, tags=["madloop"],
                                     pull_steps=[], enforce_parameter_schema=False,
                                     description="One lineage of a study, as a Slurm job (madloop --fan-out).")
    return name


def run_is_final(flow_run_id) -> bool:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state is not None and state.is_final()


@contextmanager
def worker_while(pool: str) -> Iterator[SlurmWorker]:
    """A Slurm worker for ``pool`` in a thread of this process, while the block runs. Jobs of its that are still
    queued or running when the block ends early (Ctrl-C, a failure) are cancelled: no one would watch them, and
    the study's next run resumes their lineages."""
    worker = SlurmWorker(work_pool_name=pool, name=f"madloop-{socket.gethostname()}-{os.getpid()}",
                         create_pool_if_not_found=False)
    api = PREFECT_API_URL.value()  # settings live in context variables, which a new thread does not inherit
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.Task] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_WORKER_QUERY_SECONDS: QUERY_SECONDS}):
            holder["task"] = loop.create_task(worker.start(printer=lambda *_: started.set()))
            try:
                loop.run_until_complete(holder["task"])
            except (asyncio.CancelledError, Exception) as err:  # noqa: BLE001  (stopped, or it failed: logged)
                if not isinstance(err, asyncio.CancelledError):
                    logger.error(f"the study's Slurm worker stopped: {err}")
            finally:
                loop.close()
                started.set()

    thread = threading.Thread(target=serve, name=f"slurm-worker-{pool}", daemon=True)
    thread.start()
    started.wait(60)
    try:
        yield worker
    finally:
        jobs = dict(worker.jobs)  # job id -> flow run id (the worker's thread changes its own)
        left = [job for job, run in jobs.items() if not run_is_final(run)]
        if left:
            logger.warning(f"cancelling Slurm job(s) {', '.join(left)}: the study stopped before them; its next run "
                           "resumes their lineages")
            for job in left:
                try:
                    cancel(job)
                except SlurmError as err:
                    logger.warning(str(err))
        # A job outlives its flow run by the moments its process takes to exit: wait for that, so that when the
        # study returns none of its jobs is still in Slurm's queue (a script may scancel, sbatch or read logs next).
        finishing = wait_ended(list(jobs), ENDING_SECONDS)
        if finishing:
            logger.warning(f"Slurm job(s) {', '.join(finishing)} had not ended {ENDING_SECONDS:g} s after their "
                           "flow runs; left to finish")
        if "task" in holder and not loop.is_closed():
            loop.call_soon_threadsafe(holder["task"].cancel)
        thread.join(30)
