"""Slurm through the commands every cluster user has (``sbatch``, ``scontrol``, ``sinfo``, ``scancel``): a lineage's
job from its ``slurm`` params (``SlurmParams``, a core params section), its state, and the checks that a controller answers
and that its partitions can grant what each lineage asks for, made before any work starts.

The commands, not Slurm's REST API (``slurmrestd``): they need no token and no extra daemon, and they are the same
on every Slurm version a cluster runs; a login node, where studies are started, always has them.
"""

from __future__ import annotations

import math
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping
from urllib.parse import urlparse

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from models.registry import Settings

TIMEOUT_SECONDS = 30.0  # a controller that does not answer in this long is not reachable
# A job's state once it has ended (scontrol's JobState); any other state is still queued or running.
ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "TIMEOUT", "REVOKED", "SPECIAL_EXIT"})


class SlurmParams(Settings):
    """What each lineage's Slurm job asks for, when a study fans out to a Slurm work pool (``madloop run --fan-out
    slurm``). Per lineage through its ``set`` ({name: ple, set: {slurm.gpus: 1}}). Decides where
    lineages run, never what they make: no resume hash holds it."""

    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"partition", "cpus", "memory_gb", "gpus", "time_minutes", "extra_args"})

    partition: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # null: the cluster's default partition
    cpus: PositiveInt = 1  # --cpus-per-task; also the job's OMP_NUM_THREADS (torch's threads)
    memory_gb: PositiveFloat = 4.0  # --mem
    gpus: NonNegativeInt = 0  # --gres=gpu:<gpus>
    time_minutes: PositiveInt = 240  # --time; a job that reaches it is stopped, its lineage resumes next run
    extra_args: list[str] = Field(default_factory=list)  # more sbatch options, e.g. [--account=lab, --qos=normal]


class SlurmError(RuntimeError):
    """A Slurm command failed (the message is its own, on one line)."""


def slurm(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run one Slurm command; its stdout, or SlurmError with its message."""
    try:
        done = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                              env=None if env is None else dict(env))
    except FileNotFoundError:
        raise SlurmError(f"{args[0]}: command not found (no Slurm client here: `make slurm` starts one on this "
                         "machine)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]}: no answer in {TIMEOUT_SECONDS:g} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise SlurmError(f"{args[0]}: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout


# --- a lineage's job ---------------------------------------------------------------------------------------------


def memory_mb(settings: SlurmParams) -> int:
    return math.ceil(settings.memory_gb * 1024)


def resource_args(settings: SlurmParams) -> list[str]:
    """The sbatch options that ask for what ``settings`` say (one task; its CPUs, memory, GPUs, time)."""
    args = ["--ntasks=1", f"--cpus-per-task={settings.cpus}", f"--mem={memory_mb(settings)}M",
            f"--time={settings.time_minutes}"]
    if settings.partition:
        args.append(f"--partition={settings.partition}")
    if settings.gpus:
        args.append(f"--gres=gpu:{settings.gpus}")
    return [*args, *settings.extra_args]


def job_args(settings: SlurmParams, *, name: str, working_dir: Path, output: str) -> list[str]:
    """sbatch options for one lineage's job. ``--no-requeue``: a pre-empted job ends (its flow run is then
    Crashed and the study's next run resumes the lineage) instead of starting again under the same flow run."""
    return ["--parsable", f"--job-name={name}", f"--chdir={working_dir}", f"--output={output}", "--no-requeue",
            "--export=ALL", *resource_args(settings)]


def job_script(command: str) -> str:
    """The batch script: the flow run's command in place of the shell, so that the signals Slurm sends (scancel,
    the time limit, pre-emption) reach Prefect's engine, which records the run as crashed."""
    return f"#!/bin/bash\nexec {command}\n"


def submit(settings: SlurmParams, command: str, *, name: str, working_dir: Path, output: str,
           env: Mapping[str, str]) -> str:
    """``sbatch`` one job; its id. The job inherits ``env`` (``--export=ALL``)."""
    (working_dir / Path(output).parent).mkdir(parents=True, exist_ok=True)  # sbatch makes no folders
    out = slurm("sbatch", *job_args(settings, name=name, working_dir=working_dir, output=output),
                stdin=job_script(command), env=env)
    return out.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"


@dataclass(frozen=True)
class JobState:
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    exit_code: int  # the batch script's exit status (its signal, 128 + n, when a signal ended it)
    reason: str

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def describe(self, job: str) -> str:
        reason = f", {self.reason}" if self.reason and self.reason != "None" else ""
        return f"Slurm job {job} ended {self.state} (exit code {self.exit_code}{reason})"


def job_state(job: str) -> JobState | None:
    """The job's state as the controller knows it; None once it has forgotten the job (``MinJobAge`` after its
    end, 300 s by default)."""
    try:
        out = slurm("scontrol", "show", "job", "--oneliner", job)
    except SlurmError as err:
        if "Invalid job id" in str(err):
            return None
        raise
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    status, _, signal = fields.get("ExitCode", "0:0").partition(":")
    code = 128 + int(signal) if signal.isdigit() and int(signal) else int(status or 0)
    return JobState(fields.get("JobState", "UNKNOWN"), code, fields.get("Reason", ""))


def cancel(job: str) -> None:
    slurm("scancel", job)


def wait_ended(jobs: list[str], seconds: float, step: float = 0.5) -> list[str]:
    """Wait up to ``seconds`` for ``jobs`` to end (a job whose flow run has finished is still COMPLETING while
    its process exits); return those that have not."""
    deadline = time.monotonic() + seconds
    left = list(jobs)
    while left:
        try:
            left = [job for job in left if (state := job_state(job)) is not None and not state.ended]
        except SlurmError:  # the controller is busy or restarting: ask again
            pass
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(step)
    return left


def thread_env(settings: SlurmParams, env: Mapping[str, str]) -> dict[str, str]:
    """Without cgroups a job sees every CPU of its node: torch would start a thread per CPU in each of the jobs
    sharing it. One per CPU asked for, unless the environment already says."""
    return {"OMP_NUM_THREADS": str(settings.cpus), **{k: v for k, v in env.items() if k == "OMP_NUM_THREADS"}}


# --- checks before any work --------------------------------------------------------------------------------------


@dataclass
class Partition:
    name: str
    default: bool
    up: bool
    cpus: int  # the most on one node
    memory_mb: int  # the most on one node
    gpus: int  # the most on one node
    max_minutes: float  # math.inf: no limit


def minutes(text: str) -> float:
    """Slurm's time format in minutes: ``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``,
    ``days-hours[:minutes[:seconds]]``; ``infinite`` is math.inf."""
    text = text.strip().lower()
    if text in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days, dash, rest = text.partition("-")
    if dash:
        h, m, sec = ([int(x) for x in rest.split(":")] + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + sec / 60
    parts = [int(x) for x in text.split(":")]
    if len(parts) == 1:  # minutes
        return float(parts[0])
    if len(parts) == 2:  # minutes:seconds
        return parts[0] + parts[1] / 60
    h, m, sec = parts
    return h * 60 + m + sec / 60


def gpu_count(gres: str) -> int:
    """GPUs in a node's GRES (``gpu:a100:4(S:0-1),gpu:2``: 6; ``(null)``: 0)."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if parts[-1].isdigit() else 1
    return total


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, from one ``sinfo`` (a line per group of alike nodes)."""
    out: dict[str, Partition] = {}
    for line in slurm("sinfo", "--noheader", "--format=%P|%a|%c|%m|%G|%l").splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        name, avail, cpus, mem, gres, limit = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        number = lambda text: int(re.sub(r"\D", "", text) or 0)  # "2+" -> 2
        part = out.setdefault(name, Partition(name, default, avail == "up", 0, 0, 0, minutes(limit)))
        part.cpus = max(part.cpus, number(cpus))
        part.memory_mb = max(part.memory_mb, number(mem))
        part.gpus = max(part.gpus, gpu_count(gres))
    return out


class SlurmUnfit(ValueError):
    """No controller answers, or it cannot grant a job: the message names the setting."""


def check(settings: Mapping[str, SlurmParams], study: SlurmParams, target: str = "slurm") -> None:
    """SlurmUnfit, naming the setting, unless a Slurm controller answers and every lineage's job (``settings``:
    lineage -> its slurm params; ``study``: the study's own) can be granted: its partition exists and is up, and one
    of its nodes has the CPUs, memory and GPUs, within its time limit; then the controller itself judges each
    distinct job (``sbatch --test-only``, which also covers ``extra_args``)."""
    try:
        known = partitions()
    except SlurmError as err:
        raise SlurmUnfit(f"--fan-out {target}: no Slurm controller answers here ({err})") from None
    if not known:
        raise SlurmUnfit(f"--fan-out {target}: the Slurm controller reports no partitions")
    judged: set[tuple] = set()
    for name, lineage in settings.items():
        whose = "" if lineage == study else f" (lineage {name!r})"
        problem = partition_problem(lineage, known)
        if problem:
            raise SlurmUnfit(f"{problem}{whose}")
        args = tuple(resource_args(lineage))
        if args in judged:
            continue
        judged.add(args)
        try:
            slurm("sbatch", "--test-only", "--job-name=madloop-check", "--output=/dev/null", *args, "--wrap=true")
        except SlurmError as err:
            raise SlurmUnfit(f"slurm: the controller would not accept the job{whose}: "
                             f"{str(err).removeprefix('sbatch: ')} (sbatch {shlex.join(args)})") from None


def partition_problem(settings: SlurmParams, known: dict[str, Partition]) -> str | None:
    names = ", ".join(sorted(known))
    if settings.partition is None:
        part = next((x for x in known.values() if x.default), None)
        if part is None:
            return f"slurm.partition: this cluster has no default partition: name one ({names})"
        key = f"the default partition {part.name!r}"
    elif settings.partition not in known:
        return f"slurm.partition: no partition {settings.partition!r} on this cluster ({names})"
    else:
        part = known[settings.partition]
        key = f"partition {part.name!r}"
    if not part.up:
        return f"slurm.partition: {key} is not up"
    if settings.cpus > part.cpus:
        return f"slurm.cpus: {settings.cpus} CPUs asked, {key} has at most {part.cpus} on a node"
    if memory_mb(settings) > part.memory_mb:
        return (f"slurm.memory_gb: {settings.memory_gb:g} GB asked, {key} has at most "
                f"{part.memory_mb / 1024:.4g} GB on a node")
    if settings.gpus > part.gpus:
        has = f"at most {part.gpus}" if part.gpus else "none"
        return f"slurm.gpus: {settings.gpus} GPU(s) asked, {key} has {has} on a node"
    if settings.time_minutes > part.max_minutes:
        return (f"slurm.time_minutes: {settings.time_minutes} minutes asked, {key} allows at most "
                f"{part.max_minutes:g}")
    return None



def loopback_problem(api_url: str | None, target: str) -> str | None:
    """Why jobs could not report to the Prefect API: it listens on this machine's loopback address (a temporary
    server's, or ``prefect server start`` without ``--host``) and the cluster has nodes other than this one."""
    host = (urlparse(api_url or "").hostname or "").lower()
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        return None
    here = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    others = sorted(set(slurm("sinfo", "--noheader", "--Node", "--format=%N").split()) - here)
    if not others:
        return None
    return (f"--fan-out {target}: the Prefect API ({api_url or 'a temporary server'}) is on this machine's loopback "
            f"address, which jobs on {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} cannot reach: start "
            "`prefect server start --host <an address the nodes reach>` and export PREFECT_API_URL (docs/scale-out.md)")
