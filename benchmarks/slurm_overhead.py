"""What a lineage costs as a Slurm job: one study, run three ways, in one script.

    python benchmarks/slurm_overhead.py                      # 10 lineages (mle, seeds 0-9), 2 generations
    python benchmarks/slurm_overhead.py --lineages 4 --epochs 2

- **plain**: ``madloop run``: the lineages one after another in the study's process.
- **process pool**: ``madloop run --fan-out lineage/bench-process``: each lineage a flow run of a deployment on a
  ``process`` work pool whose worker runs two at once (``--limit 2``; this machine's 2 CPUs).
- **slurm**: ``madloop run --fan-out slurm``: each lineage a Slurm job (1 CPU each) on the local single-node Slurm
  (``make slurm``; 2 CPUs, so 8 of 10 jobs queue), submitted and watched by the study's own worker.

Each runs in a fresh project (git + DVC, its own MLflow sqlite store) against one Prefect server that this script
starts, with the domain classifier trained once beforehand and copied into every project, one thread per process
(OMP_NUM_THREADS=1). The per-lineage breakdown comes from the Prefect API (each lineage flow run's creation, claim by
a worker, start and end) and, for Slurm, from the controller (each job's submit, start and end time; whole
seconds): what is not the lineage's own flow run is overhead. Slurm is brought up first when it is not (and stopped
at the end if this script started it). The machine is shared with other work: compare the three within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import yaml  # noqa: E402

BIN = Path(sys.executable).parent


def study(lineages: int, generations: int, epochs: int) -> dict:
    return {"study": {"name": "bench"}, "data": {"imbalance_ratio": 4}, "train": {"epochs": epochs, "batch_size": 64},
            "loop": {"generations": generations}, "classifier": {"epochs": 2},
            "score": {"samples": 80, "kid_subset_size": 40, "bootstrap": 10},
            "lineages": [{"name": "mle", "seeds": list(range(lineages))}], "tracking": {"batch_records": "never"}}


def project(root: Path, params: dict, cache_from: Path | None = None) -> Path:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if cache_from is not None:
        shutil.copytree(cache_from / "data" / "cache", root / "data" / "cache", ignore=shutil.ignore_patterns("*.lock"))
    return root


def madloop(root: Path, env: dict, *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "madloop"), "run", "--quiet", *args], cwd=root, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"madloop run {' '.join(args)} failed in {root}:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("the Prefect server did not start in 300 s")


def lineage_runs(deployment: str | None) -> list:
    """The lineage flow runs of the last study (of ``deployment``; None: the plain run's subflows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="bench/")),
                                     limit=200)
        if deployment is not None:
            target = client.read_deployment_by_name(deployment).id
            runs = [r for r in runs if r.deployment_id == target]
        else:
            runs = [r for r in runs if r.deployment_id is None]
        return [(r, client.read_flow_run_states(r.id)) for r in runs]


def first(states, kind: str) -> float:
    return min(s.timestamp.timestamp() for s in states if s.type.value == kind)


def slurm_times(job: str) -> dict[str, float]:
    """A job's submit, start and end (whole seconds). Read once it has ended: a running job's EndTime is the
    end of its time limit; the study returns when its flow runs end, which can be before their jobs do."""
    for _ in range(600):
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        if fields.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.2)
    return {key: datetime.fromisoformat(fields[key]).timestamp() for key in ("SubmitTime", "StartTime", "EndTime")}


def breakdown(runs: list, slurm: bool) -> dict[str, float]:
    """Mean seconds per lineage: claimed (created -> a worker took it; Slurm: -> sbatch), queued (Slurm: submit ->
    start), started (-> the engine's Running state: process, imports, flow loading), work (the flow run), ended
    (Slurm: flow run end -> job end)."""
    rows = []
    for run, states in runs:
        created = run.created.timestamp()
        claimed, running, done = first(states, "PENDING"), run.start_time.timestamp(), run.end_time.timestamp()
        row = {"work": done - running}
        if slurm:
            job = slurm_times(run.infrastructure_pid)
            row.update(claimed=job["SubmitTime"] - created, queued=job["StartTime"] - job["SubmitTime"],
                       started=running - job["StartTime"], ended=job["EndTime"] - done)
        else:
            row.update(claimed=claimed - created, started=running - claimed)
        rows.append(row)
    return {key: statistics.mean(r[key] for r in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lineages", type=int, default=10)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/madloop-slurm-bench"))
    parser.add_argument("--report", type=Path, default=None, metavar="RESULT_JSON",
                        help="print the table of an earlier run's result.json, and stop")
    args = parser.parse_args()
    if args.report is not None:
        report(json.loads(args.report.read_text()))
        return

    up = subprocess.run(["make", "-s", "-C", str(REPO), "slurm"], capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"no Slurm here: {(up.stdout + up.stderr).strip().splitlines()[-1:]}")
    started_slurm = up.stdout.strip().splitlines()[-1] == "slurm: started"
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    server, url = prefect_server(args.workdir / "prefect-home")
    os.environ["PREFECT_API_URL"] = url
    env = {**os.environ, "PREFECT_API_URL": url, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    worker = None
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate

        params = study(args.lineages, args.generations, args.epochs)
        warm = project(args.workdir / "warm", {**params, "lineages": ["mle"], "loop": {"generations": 1}})
        madloop(warm, env)  # the domain classifier, trained once for all three
        roots = {mode: project(args.workdir / mode, params, cache_from=warm) for mode in ("plain", "process", "slurm")}

        with get_client(sync_client=True) as client:  # a process pool whose worker runs two lineages at once
            client.create_work_pool(WorkPoolCreate(name="bench-process", type="process"))
            client.create_deployment(flow_id=client.create_flow_from_name("lineage"), name="bench-process",
                                     entrypoint="flows.loop.lineage_loop", work_pool_name="bench-process",
                                     pull_steps=[], job_variables={"working_dir": str(roots["process"])})
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "bench-process", "--limit",
                                   "2", "--name", "bench"], env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(10)  # the worker is polling

        wall = {"plain": madloop(roots["plain"], env)}
        per = {"plain": breakdown(lineage_runs(None), slurm=False)}
        wall["process"] = madloop(roots["process"], env, "--fan-out", "lineage/bench-process")
        per["process"] = breakdown(lineage_runs("lineage/bench-process"), slurm=False)
        wall["slurm"] = madloop(roots["slurm"], env, "--fan-out", "slurm")
        per["slurm"] = breakdown(lineage_runs("lineage/slurm"), slurm=True)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        server.terminate()
        server.wait(30)
        if started_slurm:
            subprocess.run(["make", "-s", "-C", str(REPO), "slurm-down"], capture_output=True)

    result = {"lineages": args.lineages, "generations": args.generations, "epochs": args.epochs, "wall": wall,
              "per_lineage": per, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine()}
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1))
    report(result)


def report(result: dict) -> None:
    """The table, and the overheads per lineage: what a lineage costs beyond its own work in the plain run."""
    n, wall, per = result["lineages"], result["wall"], result["per_lineage"]
    print(f"{n} lineages x {result['generations']} generations x {result['epochs']} epochs (digits, mle seeds "
          f"0-{n - 1}); {result['machine']}, {result['cpus']} CPUs, load average {result['load_average'][0]:.1f} at "
          "the end; one thread per process\n")
    print("| run | wall (s) | vs plain | per lineage: claimed | queued | started | flow run | ended (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, label in (("plain", "plain `madloop run`"), ("process", "process pool, 2 at once"),
                        ("slurm", "Slurm, 2 CPUs")):
        b = per[mode]
        cells = [f"{b[k]:.1f}" if k in b else "" for k in ("claimed", "queued", "started", "work", "ended")]
        print(f"| {label} | {wall[mode]:.0f} | {wall[mode] / wall['plain']:.2f} | " + " | ".join(cells) + " |")
    own = per["plain"]["work"]  # the lineage's own work, as a subflow of the plain run
    slurm, pool = per["slurm"], per["process"]
    # The process pool's "claimed" is mostly waiting for one of the worker's 2 slots (queueing), so it is left out.
    print(f"\noverhead per lineage, beyond its {own:.1f} s in the plain run: as a Slurm job "
          f"{slurm['claimed'] + slurm['started'] + slurm['work'] - own + slurm['ended']:.1f} s (worker pick-up and "
          f"sbatch {slurm['claimed']:.1f}, job start to flow run {slurm['started']:.1f}, the flow run's own set-up "
          f"{slurm['work'] - own:.1f}, flow run end to job end {slurm['ended']:.1f}); on the process pool "
          f"{pool['started'] + pool['work'] - own:.1f} s (process start {pool['started']:.1f}, set-up "
          f"{pool['work'] - own:.1f}). Slurm vs the process pool, wall time: x{wall['slurm'] / wall['process']:.2f}, "
          f"{(wall['slurm'] - wall['process']) / n:+.1f} s per lineage")

if __name__ == "__main__":
    main()
