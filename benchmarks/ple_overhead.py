"""PLE vs MLE wall time per generation on the default study, in one process.

    python benchmarks/ple_overhead.py                      # default params.yaml (digits, its epochs)
    python benchmarks/ple_overhead.py --set train.epochs=100 --repeats 5
    python benchmarks/ple_overhead.py --family diffusion --repeats 3   # any family (--set model.family=...)
    python benchmarks/ple_overhead.py --params examples/mnist5k.yaml   # 28x28 MNIST, the paper's VAE

Training speed is also printed as images per second per epoch: training rows x epochs / fit seconds.

One generation = fit on the real training set, sample the next dataset, score (torch-fidelity + classifier)
and write the generation's files: what the flow does per generation, minus Prefect/DVC/MLflow bookkeeping
(see benchmarks/orchestration_overhead.py for that). MLE and PLE alternate, so machine noise hits both alike;
the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.generation import PLAIN, resolve_device, run_generation  # noqa: E402
from tasks.params import load  # noqa: E402
from tasks.study import Study  # noqa: E402


def one_generation(lineage) -> tuple[float, float, dict]:
    """Generation 0 of ``lineage`` on the real training set: (fit seconds, generation seconds, metrics)."""
    started = time.perf_counter()
    generation = run_generation(lineage, 0, lineage.real.train, PLAIN)
    return generation.model.info["fit_seconds"], time.perf_counter() - started, generation.manifest["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--family", help="model family (shorthand for --set model.family=NAME)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    family = [f"model.family={args.family}"] if args.family else []
    p = load(args.params, family + args.overrides + ["lineages=[mle, ple]"])
    device = resolve_device(p.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        study = Study.open(p, Path(tmp), check=False)
        lineages = {name: study.lineage(name) for name in ("mle", "ple")}
        times: dict[str, list[tuple[float, float]]] = {"mle": [], "ple": []}
        metrics: dict[str, dict] = {}
        for _ in range(args.repeats):
            for estimator, lineage in lineages.items():
                fit, total, metrics[estimator] = one_generation(lineage)
                times[estimator].append((fit, total))

    med = {e: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for e, ts in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}, torch {torch.__version__}")
    print(f"study: {p.data.source}, {len(lineages['mle'].real.train)} training rows, family {p.model.family}, "
          f"{p.train.epochs} epochs at batch {p.train.batch_size}, PLE m={p.ple.m} rank={p.ple.rank} "
          f"lam={p.ple.lam}; median of {args.repeats} alternating runs")
    for estimator, (fit, total) in med.items():
        quality = f"fid {metrics[estimator]['fid']:.2f}" if "fid" in metrics[estimator] else ""
        speed = len(real.train) * p.train.epochs / fit
        print(f"  {estimator}: fit {fit:.2f} s ({speed:,.0f} images/s per epoch), generation {total:.2f} s  {quality}")
    print(f"PLE/MLE wall-time ratio per generation: {med['ple'][1] / med['mle'][1]:.2f} "
          f"(fit alone: {med['ple'][0] / med['mle'][0]:.2f})")


if __name__ == "__main__":
    main()
