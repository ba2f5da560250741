"""PLE vs MLE wall time per generation on the default study, in one process.

    python benchmarks/ple_overhead.py                      # default params.yaml (digits, its epochs)
    python benchmarks/ple_overhead.py --set train.epochs=100 --repeats 5

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

from tasks.params import load  # noqa: E402
from tasks.datasets import load_real  # noqa: E402
from tasks.scoring import build_scorer  # noqa: E402
from tasks.study import save_generation  # noqa: E402
from tasks.training import build_family, fit_model, make_next_dataset, resolve_device, sample_synthetic  # noqa: E402


def one_generation(p, family, real, scorer, estimator: str, device, folder: Path) -> tuple[float, float, dict]:
    started = time.perf_counter()
    model = fit_model(family, estimator, real.train, p, seed=1, device=device)
    fit = time.perf_counter() - started
    synthetic = sample_synthetic(model, len(real.train), 2, estimator, 1, p.data.source)
    next_dataset = make_next_dataset(p.loop.mode, real.train, real.train, synthetic)
    samples, metrics = scorer.evaluate(model, 3)
    save_generation(folder / estimator, 0, model.tensors(), next_dataset, lambda path: scorer.picture(samples, path),
                    metrics, {}, "", {"path": "", "sha256": "", "md5": ""}, model.info)
    return fit, time.perf_counter() - started, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    p = load(args.params, args.overrides)
    device = resolve_device(p.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        real = load_real(p.data, p.seed, root, build_family(p, (1,)) if p.data.source == "model" else None)
        scorer, _ = build_scorer(p, real, root / "cache", device)
        family = build_family(p, real.train.shape)
        times: dict[str, list[tuple[float, float]]] = {"mle": [], "ple": []}
        metrics: dict[str, dict] = {}
        for _ in range(args.repeats):
            for estimator in ("mle", "ple"):
                fit, total, metrics[estimator] = one_generation(p, family, real, scorer, estimator, device, root)
                times[estimator].append((fit, total))

    med = {e: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for e, ts in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}, torch {torch.__version__}")
    print(f"study: {p.data.source}, {len(real.train)} training rows, family {p.model.family}, "
          f"{p.train.epochs} epochs at batch {p.train.batch_size}, PLE m={p.ple.m} rank={p.ple.rank} "
          f"lam={p.ple.lam}; median of {args.repeats} alternating runs")
    for estimator, (fit, total) in med.items():
        quality = f"fid {metrics[estimator]['fid']:.2f}" if "fid" in metrics[estimator] else ""
        print(f"  {estimator}: fit {fit:.2f} s, generation {total:.2f} s  {quality}")
    print(f"PLE/MLE wall-time ratio per generation: {med['ple'][1] / med['mle'][1]:.2f} "
          f"(fit alone: {med['ple'][0] / med['mle'][0]:.2f})")


if __name__ == "__main__":
    main()
