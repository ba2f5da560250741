"""Cheap generations stay cheap: a 1-D study whose fits take milliseconds, with and without batched records.

    python benchmarks/cheap_generations.py                    # 2 recipes x 5 seeds x 30 generations (issue 14)
    python benchmarks/cheap_generations.py --generations 10 --seeds 2 --repeats 2
    python benchmarks/cheap_generations.py --cli-only --repeats 3 --compare-with /tmp/base   # this code vs another

The study (gaussian family, real data drawn from its truth; recipes ``mle`` and ``ple_closed``, each over
``--seeds`` seeds) runs through the full ``self_consuming_loop`` flow (Prefect, DVC, MLflow) in fresh projects:

- **per generation** (``tracking.batch_records=never``, how the image families are recorded): each generation
  as Prefect tasks, its own MLflow nested run (params, inputs, logged model, artifacts), ``dvc add`` after it;
- **batched** (``auto``, the 1-D families' default): generations run as plain functions and are recorded in
  batches on the lineage's MLflow run, ``dvc add`` once at the lineage's end;
- **bare**: the same generations through the plain runner (``tasks.study``) with no observers: no Prefect, DVC
  or MLflow, the floor;
- **through the CLI**: ``madloop run --params cheap.yaml --quiet`` (batched) in a fresh ``git init && dvc init``
  project, timed as a user waits for it: Python's start-up and imports, the MLflow store's creation and, without
  ``PREFECT_API_URL``, the temporary Prefect server's start-up included; then again with this script's server in
  ``PREFECT_API_URL`` (a running server). Wall time, and CPU time of the command and its children. With
  ``--compare-with CHECKOUT`` (e.g. ``git worktree add /tmp/base main``) the same two runs of that checkout's code
  alternate with this one's (``python -m flows.cli`` with its tree first on ``PYTHONPATH``, this venv), so a
  change's ratio is measured under one machine load; ``--cli-only`` skips the in-process variants.
- **the floor**: what Prefect, MLflow and DVC cost before any study, in a fresh interpreter: importing them,
  creating an MLflow store, one ``dvc add`` of a small file, and an empty Prefect flow on a temporary server (the
  server's CPU included). No study through the CLI can cost less over the bare loop.

Overhead (issue 23) is the share of a run's CPU time that is not the generations' own work: (CPU of the run - CPU of
the bare loop) / CPU of the run. A CLI run's CPU is that of the command and its children (the temporary server
included); its bare loop is run the same way, as a script in a fresh interpreter (Python's start-up and the science's
imports included: torch, scipy, matplotlib). The in-process variants compare wall times with the warm bare loop.

The two flow variants alternate (``--repeats``), so their ratio is measured under the same machine load; the best
run of each counts. Kept out of the timings, as in benchmarks/orchestration_overhead.py: the Prefect server's
start-up (PREFECT_API_URL's server is reused, else a temporary one is started first), ``git init && dvc init`` and
creating the MLflow store's tables. Every run's time is printed, with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import resource  # noqa: E402
import subprocess  # noqa: E402

import yaml  # noqa: E402

from benchmarks.orchestration_overhead import bare_study, new_project, prefect_server  # noqa: E402
from tasks.params import Params, load  # noqa: E402


def study_params(generations: int, seeds: int, batch_records: str) -> Params:
    return load(None, ["study.name=cheap", "model.family=gaussian", "data.source=model",
                       f"loop.generations={generations}", f"tracking.batch_records={batch_records}",
                       f"lineages=[{{name: mle, seeds: {list(range(seeds))}}}, "
                       f"{{name: ple_closed, seeds: {list(range(seeds))}}}]"])


def running_children_cpu() -> float:
    """CPU seconds so far of this process's running descendants (here: the Prefect server this script started);
    0 where /proc is missing."""
    def children(pid: int) -> list[int]:
        try:
            return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    def cpu(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(cpu, children(pid)))

    return sum(map(cpu, children(os.getpid())))


def cli_study(generations: int, seeds: int, root: Path, api: str | None,
              checkout: Path = REPO) -> tuple[float, float, float]:
    """(wall, CPU, running server's CPU) seconds of ``madloop run`` (the code of ``checkout``) on the study in a
    fresh project ``root``; ``api``: the Prefect server to use (this script's: its CPU during the run is the third
    figure), or None for the command's own temporary server (its CPU is in the command's)."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "cheap.yaml").write_text(yaml.safe_dump(
        {"study": {"name": "cheap"}, "model": {"family": "gaussian"}, "data": {"source": "model"},
         "loop": {"generations": generations},
         "lineages": [{"name": name, "seeds": list(range(seeds))} for name in ("mle", "ple_closed")]}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | ({"PREFECT_API_URL": api} if api else {})
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    server = running_children_cpu()
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    # what the `madloop` script runs, for either checkout (the venv's script imports this one's)
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", "cheap.yaml", "--quiet"], cwd=root, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    server = running_children_cpu() - server if api else 0.0
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), server


FLOOR = r"""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
cpu, stages = time.process_time, {}
def stage(name, started):
    stages[name] = cpu() - started
    return cpu()
c = cpu()
import prefect.flows, prefect.tasks
c = stage("import prefect", c)
import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store
c = stage("import mlflow", c)
import dvc.repo
c = stage("import dvc", c)
tmp = Path(tempfile.mkdtemp())
mlflow.tracking.MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()
c = stage("new MLflow store", c)
subprocess.run(["git", "init", "-q"], cwd=tmp, check=True)
subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp, check=True)
(tmp / "data.csv").write_text("x\n1\n")
c = cpu()
with dvc.repo.Repo(str(tmp)) as repo:
    repo.add([str(tmp / "data.csv")])
c = stage("dvc add", c)
before = os.times()
from flows.server import prefect_api
with prefect_api():
    prefect.flow(name="empty")(lambda: None)()
after = os.times()  # the server, stopped and waited for, is a child: its CPU is in the children's times
server = after.children_user + after.children_system - before.children_user - before.children_system
stages["empty flow, temporary server"] = cpu() - c + server
print(json.dumps(stages))
"""


COLD_BARE = r"""
import sys, time
from pathlib import Path
from benchmarks.cheap_generations import study_params
from benchmarks.orchestration_overhead import bare_study
bare_study(study_params(int(sys.argv[1]), int(sys.argv[2]), "auto"), Path(sys.argv[3]))
print(sorted(name for name in ("prefect", "mlflow", "dvc") if name in sys.modules))
"""


def cold_bare(generations: int, seeds: int, root: Path) -> float:
    """CPU seconds of the bare loop in a fresh interpreter, as a script would run it: Python's start-up and the
    science's imports (torch, scipy, matplotlib) included, none of Prefect, MLflow or DVC (checked)."""
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", COLD_BARE, str(generations), str(seeds), str(root)], env=env,
                         check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    imported = out.strip().splitlines()[-1]
    assert imported == "[]", f"the bare loop imported {imported}"
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def floor() -> dict[str, float]:
    """CPU seconds of each part of the floor (see the module docstring), in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", FLOOR], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def full_study(p: Params, root: Path) -> float:
    from flows.loop import run_study

    started = time.perf_counter()
    run_study(p, root)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="per-generation/batched pairs, alternating")
    parser.add_argument("--cli-only", action="store_true", help="time only `madloop run` through the CLI")
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT",
                        help="also time `madloop run` of another checkout of madloop, alternating with this one's")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    variants = {"per generation": study_params(args.generations, args.seeds, "never"),
                "batched": study_params(args.generations, args.seeds, "auto")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    loads = [os.getloadavg()[0]]
    with prefect_server() as (api, startup), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = study_params(1, 1, "auto")
        full_study(warm, new_project(tmp, "warm", warm))  # first-call imports and warm-ups, untimed
        started, cpu_started = time.perf_counter(), time.process_time()
        bare_study(variants["batched"], tmp / "bare")
        bare, bare_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        cold = min(cold_bare(args.generations, args.seeds, tmp / f"cold-{i}") for i in range(args.repeats))
        for i in range(0 if args.cli_only else args.repeats):
            for name, p in variants.items():
                root = new_project(tmp, f"{name.replace(' ', '-')}-{i}", p)
                times[name].append(full_study(p, root))
                loads.append(os.getloadavg()[0])
                print(f"  {name} #{i + 1}: {times[name][-1]:.1f} s (load average {loads[-1]:.2f})", flush=True)
        checkouts = {"": REPO} | ({f" ({args.compare_with})": args.compare_with.resolve()} if args.compare_with else {})
        runs = {f"{server}{label}": (server, checkout) for label, checkout in checkouts.items()
                for server in ("temporary server", "running server")}
        cli: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
        for i in range(args.repeats):
            for n, (name, (server, checkout)) in enumerate(runs.items()):
                run = cli_study(args.generations, args.seeds, tmp / f"cli-{n}-{i}",
                                None if server == "temporary server" else api, checkout)
                cli[name].append(run)
                loads.append(os.getloadavg()[0])
                print(f"  madloop run, {name} #{i + 1}: {run[0]:.1f} s wall, {run[1]:.1f} s CPU"
                      + (f" + {run[2]:.1f} s the server's" if run[2] else "")
                      + f" (load average {loads[-1]:.2f})", flush=True)

    generations = 2 * args.seeds * args.generations
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; load average "
          f"{min(loads):.2f}-{max(loads):.2f} during the runs")
    print(f"prefect server: {api} " + (f"(temporary, started in {startup:.1f} s, outside the timed runs)"
                                      if startup else "(reused)"))
    print(f"study: gaussian, recipes mle and ple_closed x {args.seeds} seeds x {args.generations} generations "
          f"= {generations} generations")
    print(f"bare loop (no Prefect, DVC, MLflow): {bare:.1f} s wall, {bare_cpu:.1f} s CPU "
          f"({bare / generations * 1000:.0f} ms per generation); as a script in a fresh interpreter, {cold:.1f} s CPU "
          f"(best of {args.repeats})")
    if not args.cli_only:
        for name in variants:
            best = min(times[name])
            print(f"{name}: {best:.1f} s (best of {args.repeats}: {[round(t, 1) for t in times[name]]}); "
                  f"{(best - bare) / generations * 1000:.0f} ms per generation over the bare loop")
        before, after = min(times["per generation"]), min(times["batched"])
        print(f"per generation / batched: {before / after:.2f}x")
        print(f"orchestration share of the batched study (time over the bare loop): {(after - bare) / after:.0%}")
    for name, runs in cli.items():
        wall, cpu, server = min(runs)
        total = cpu + server  # a running server's work for the run counts too
        print(f"madloop run through the CLI, {name}: {wall:.1f} s wall, {cpu:.1f} s CPU"
              + (f" + {server:.1f} s the running server's" if server else " (the temporary server's included)")
              + f" (best of {args.repeats}: {[round(run[0], 1) for run in runs]} s wall); overhead "
              f"{(total - cold) / total:.0%} of the CPU ({total - cold:.1f} s over the bare loop as a script)"
              + (f"; without the server's, {(cpu - cold) / cpu:.0%}" if server else ""))
    parts = floor()
    total = sum(parts.values())
    print("the floor (a fresh interpreter, CPU): " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in
                                                              parts.items()) + f"; total {total:.1f} s")
    print(f"overhead under 20% through the CLI needs a bare loop of at least 4x the overhead: with the floor alone, "
          f"{4 * total:.0f} s of CPU; this study's, as a script, is {cold:.1f} s")
    if args.compare_with:
        for server in ("temporary server", "running server"):
            other = min(cli[f"{server} ({args.compare_with})"])[0]
            print(f"{server}: this checkout / {args.compare_with}: {min(cli[server])[0] / other:.2f}x wall")


if __name__ == "__main__":
    main()
