"""S fits one after another vs one stacked fit (models/estimators/stacked.py), on this machine.

    python benchmarks/stacked_fits.py                          # the default study's VAE, S = 1, 8, 32, MLE and PLE
    python benchmarks/stacked_fits.py --epochs 20 --sizes 1 8 --threads 2

The data have the default study's shape (164 rows of 8x8 digits at R_I = 5; random pixels: the cost does not
depend on them) and the model is params.yaml's VAE at its batch size. For each S the two ways alternate
(--repeats times), so machine noise hits both alike; the medians of wall time and of this process's CPU time
are printed (on a machine shared with other jobs, CPU time is the steadier of the two with one thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.estimators import fit  # noqa: E402
from models.estimators.stacked import fit_stacked  # noqa: E402
from models.families.vae import VAEFamily, VAESettings  # noqa: E402


def clocked(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--estimators", nargs="+", default=["mle", "ple"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    family = VAEFamily((1, 8, 8), VAESettings())
    x = np.random.default_rng(0).random((164, 1, 8, 8), dtype=np.float32)
    train = {"epochs": args.epochs}
    print(f"{args.epochs} epochs of 164 rows at batch 64 ({args.epochs * 2} steps), {args.threads} torch "
          f"thread(s); medians of {args.repeats} alternating runs; load average {os.getloadavg()[0]:.2f} at the start")
    for estimator in args.estimators:
        fit_stacked(estimator, family, [x], seeds=[0], train=train)  # warm-ups
        fit(estimator, family, x, seed=0, train=train)
        for size in args.sizes:
            alone, stacked = [], []
            for _ in range(args.repeats):
                alone.append(clocked(lambda: [fit(estimator, family, x, seed=s, train=train) for s in range(size)]))
                stacked.append(clocked(lambda: fit_stacked(estimator, family, [x] * size, seeds=list(range(size)),
                                                           train=train)))
            (a_wall, a_cpu), (s_wall, s_cpu) = ([statistics.median(t[i] for t in runs) for i in (0, 1)]
                                                for runs in (alone, stacked))
            print(f"{estimator} S={size:>2}: one after another {a_wall:6.2f} s wall {a_cpu:6.2f} s CPU; stacked "
                  f"{s_wall:6.2f} s wall {s_cpu:6.2f} s CPU; stacked is {a_wall / s_wall:.2f}x (wall), "
                  f"{a_cpu / s_cpu:.2f}x (CPU) as fast")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
