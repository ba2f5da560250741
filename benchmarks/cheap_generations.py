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

The two flow variants alternate (``--repeats``), so their ratio is measured under the same machine load; the best
run of each counts. Kept out of the timings, as in benchmarks/orchestration_overhead.py: the Prefect server's
start-up (PREFECT_API_URL's server is reused, else a temporary one is started first), ``git init && dvc init`` and
creating the MLflow store's tables. Every run's time is printed, with the machine's load average.
"""

from __future__ import annotations

import argparse
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


def cli_study(generations: int, seeds: int, root: Path, api: str | None,
              checkout: Path = REPO) -> tuple[float, float]:
    """(wall, CPU) seconds of ``madloop run`` (the code of ``checkout``) on the study in a fresh project ``root``;
    ``api``: the Prefect server to use, or None for the command's own temporary server."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "cheap.yaml").write_text(yaml.safe_dump(
        {"study": {"name": "cheap"}, "model": {"family": "gaussian"}, "data": {"source": "model"},
         "loop": {"generations": generations},
         "lineages": [{"name": name, "seeds": list(range(seeds))} for name in ("mle", "ple_closed")]}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | ({"PREFECT_API_URL": api} if api else {})
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    # what the `madloop` script runs, for either checkout (the venv's script imports this one's)
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", "cheap.yaml", "--quiet"], cwd=root, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
        started = time.perf_counter()
        bare_study(variants["batched"], tmp / "bare")
        bare = time.perf_counter() - started
        for i in range(0 if args.cli_only else args.repeats):
            for name, p in variants.items():
                root = new_project(tmp, f"{name.replace(' ', '-')}-{i}", p)
                times[name].append(full_study(p, root))
                loads.append(os.getloadavg()[0])
                print(f"  {name} #{i + 1}: {times[name][-1]:.1f} s (load average {loads[-1]:.2f})", flush=True)
        checkouts = {"": REPO} | ({f" ({args.compare_with})": args.compare_with.resolve()} if args.compare_with else {})
        runs = {f"{server}{label}": (server, checkout) for label, checkout in checkouts.items()
                for server in ("temporary server", "running server")}
        cli: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for i in range(args.repeats):
            for n, (name, (server, checkout)) in enumerate(runs.items()):
                run = cli_study(args.generations, args.seeds, tmp / f"cli-{n}-{i}",
                                None if server == "temporary server" else api, checkout)
                cli[name].append(run)
                loads.append(os.getloadavg()[0])
                print(f"  madloop run, {name} #{i + 1}: {run[0]:.1f} s wall, {run[1]:.1f} s CPU "
                      f"(load average {loads[-1]:.2f})", flush=True)

    generations = 2 * args.seeds * args.generations
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; load average "
          f"{min(loads):.2f}-{max(loads):.2f} during the runs")
    print(f"prefect server: {api} " + (f"(temporary, started in {startup:.1f} s, outside the timed runs)"
                                      if startup else "(reused)"))
    print(f"study: gaussian, recipes mle and ple_closed x {args.seeds} seeds x {args.generations} generations "
          f"= {generations} generations")
    print(f"bare loop (no Prefect, DVC, MLflow): {bare:.1f} s ({bare / generations * 1000:.0f} ms per generation)")
    if not args.cli_only:
        for name in variants:
            best = min(times[name])
            print(f"{name}: {best:.1f} s (best of {args.repeats}: {[round(t, 1) for t in times[name]]}); "
                  f"{(best - bare) / generations * 1000:.0f} ms per generation over the bare loop")
        before, after = min(times["per generation"]), min(times["batched"])
        print(f"per generation / batched: {before / after:.2f}x")
        print(f"orchestration share of the batched study (time over the bare loop): {(after - bare) / after:.0%}")
    for name, runs in cli.items():
        wall, cpu = min(runs)
        print(f"madloop run through the CLI, {name}: {wall:.1f} s wall, {cpu:.1f} s CPU (best of {args.repeats}: "
              f"{[round(w, 1) for w, _ in runs]} s)")
    if args.compare_with:
        for server in ("temporary server", "running server"):
            other = min(cli[f"{server} ({args.compare_with})"])[0]
            print(f"{server}: this checkout / {args.compare_with}: {min(cli[server])[0] / other:.2f}x wall")


if __name__ == "__main__":
    main()
