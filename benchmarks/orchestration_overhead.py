"""What Prefect + DVC + MLflow cost on top of the study's computation, in one script.

    python benchmarks/orchestration_overhead.py                          # the default study (params.yaml)
    python benchmarks/orchestration_overhead.py --set loop.generations=2 --repeats 2

The same study runs twice, each time in a fresh temporary project:

- **bare**: a plain Python loop over the functions the flow's tasks wrap (tasks/*): real data, domain classifier,
  then per lineage and generation fit, sample, next dataset, score, save the generation's files and manifest,
  and the reports. No Prefect, no DVC, no MLflow.
- **full**: the ``self_consuming_loop`` flow: the same work as Prefect tasks and subflows, ``dvc add`` after every
  generation, every generation logged to MLflow (nested runs, metrics, artifacts).

Kept out of the timed runs, as a user pays them once and not per run: the Prefect server's start-up (a running
one from PREFECT_API_URL is reused, otherwise a temporary one is started first and its start-up printed
separately), ``git init && dvc init``, creating the MLflow store's tables, and first-call warm-ups (both
paths run once on a one-generation, one-epoch study first). MLFLOW_TRACKING_URI is ignored: each project
tracks into its own sqlite store. With --repeats, bare and full alternate and the best run of each counts (as
timeit does: on a shared machine the fastest run is the least disturbed one); every run's time is printed.

Training time varies by tens of percent from run to run on a shared machine, more than orchestration costs, so
the script also prints the time outside training (the run minus the ``fit_seconds`` its manifests record):
the difference between full and bare there is what Prefect, DVC and MLflow add. Both run the same generation
function (``tasks.generation.run_generation``), so any recipe (mode, mitigation) runs the same work in both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from a temporary server

import torch  # noqa: E402

from tasks.generation import resolve_device  # noqa: E402
from tasks.params import Params, load  # noqa: E402
from tasks.reports import write_reports  # noqa: E402
from tasks.storage import read_json  # noqa: E402
from tasks.study import Observer, Study  # noqa: E402

WARM_UP = ["loop.generations=1", "train.epochs=1", "classifier.epochs=1", "score.samples=120",
           "score.kid_subset_size=50"]


class Clock(Observer):
    """Seconds per generation, per lineage."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def generation_started(self, run, k):
        self.started = time.perf_counter()

    def generation_done(self, run, generation):
        self.seconds.setdefault(run.name, []).append(time.perf_counter() - self.started)


def bare_study(p: Params, root: Path) -> dict[str, list[float]]:
    """The study through the plain runner with no observers but a clock (the lineage flow's body, minus Prefect,
    DVC and MLflow); seconds per generation."""
    study, clock = Study.open(p, root, check=False), Clock()
    for spec in study.lineages:
        study.run_lineage(spec.name, observers=[clock])
    write_reports(p, study.paths, p.lineages)
    return clock.seconds


def fit_seconds(root: Path, study: str) -> float:
    """Training time of a finished run, as its manifests record it."""
    manifests = (root / "data" / "studies" / study).glob("*/gen-*.json")
    return sum(read_json(path)["info"].get("fit_seconds", 0.0) for path in manifests)


def new_project(parent: Path, name: str, p: Params) -> Path:
    """A git + DVC repository with the study's MLflow store already created (as after any first run)."""
    from tasks.tracking import client_for, tracking_uri

    root = parent / name
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    client_for(tracking_uri(p.tracking.uri, root)).search_experiments()  # creates the tables
    return root


def full_study(p: Params, root: Path) -> None:
    from flows.loop import self_consuming_loop

    self_consuming_loop(params=p.model_dump(mode="json"), root=str(root))


@contextlib.contextmanager
def prefect_server():
    """Reuse the server in PREFECT_API_URL, or start a temporary one now; yields (where, start-up seconds)."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"], 0.0
        return
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1, help="bare/full pairs, alternating; the best of each "
                                                                 "counts (default 1)")
    args = parser.parse_args()

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    p = load(args.params, args.overrides)
    warm = load(args.params, args.overrides + WARM_UP)
    bare_times, full_times, bare_rest, full_rest, per_generation = [], [], [], [], {}
    with prefect_server() as (api, startup), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bare_study(warm, tmp / "warm-bare")
        full_study(warm, new_project(tmp, "warm-full", warm))
        for i in range(args.repeats):
            started = time.perf_counter()
            per_generation = bare_study(p, tmp / f"bare-{i}")
            bare_times.append(time.perf_counter() - started)
            bare_rest.append(bare_times[-1] - fit_seconds(tmp / f"bare-{i}", p.study.name))
            root = new_project(tmp, f"full-{i}", p)
            started = time.perf_counter()
            full_study(p, root)
            full_times.append(time.perf_counter() - started)
            full_rest.append(full_times[-1] - fit_seconds(root, p.study.name))

    bare, full = min(bare_times), min(full_times)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"device {resolve_device(p.device)}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"study: {p.study.name}: {p.data.source}, lineages {[s.name for s in p.lineages]}, "
          f"{p.loop.generations} generations, {p.train.epochs} epochs at batch {p.train.batch_size}")
    print(f"prefect server: {api} " + (f"(temporary, started in {startup:.1f} s, outside the timed runs)"
                                      if startup else "(reused)"))
    for name, seconds in per_generation.items():
        print(f"  {name}: {statistics.mean(seconds):.2f} s per generation (bare, last run)")
    print(f"bare loop: {bare:.1f} s; full pipeline (Prefect + DVC + MLflow): {full:.1f} s "
          f"(best of {args.repeats}: bare {[round(t, 1) for t in bare_times]}, "
          f"full {[round(t, 1) for t in full_times]})")
    added = min(full_rest) - min(bare_rest)
    print(f"outside training: bare {min(bare_rest):.1f} s, full {min(full_rest):.1f} s: Prefect + DVC + MLflow add "
          f"{added:.1f} s, {added / bare:.1%} of the bare run")
    print(f"orchestration overhead ratio (full / bare): {full / bare:.3f} as timed; "
          f"{(bare + added) / bare:.3f} with training time held equal")


if __name__ == "__main__":
    main()
