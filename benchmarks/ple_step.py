"""Where a PLE training step's time goes: forward, backward and Adam, per kind of step, in one process.

    python benchmarks/ple_step.py --params examples/mnist5k.yaml          # the paper's MNIST VAE at 28x28
    python benchmarks/ple_step.py --params examples/mnist5k.yaml --threads 1 --set train.batch_size=64

Four kinds of step on one batch shape of the study's real training data, alternating so that machine noise hits
each alike (median of ``--steps`` each, after 10 warm-up steps):

- ``mle``: the family's own weights, the NLL and Adam (what ``fit_mle`` runs);
- ``hyper``: the lambda = 0 hypernetwork step: h1 on the batch, the low-rank emission, the NLL through
  ``functional_call``, Adam over the hypernetwork (every PLE step that is not a penalty step);
- ``penalty``: a lazy-penalty step as ``fit_ple`` runs it (sampled entries; the sparse basis gradient where the
  target is big enough for it to pay, ``HyperNetwork.distance``);
- ``penalty-dense``: the same step through the dense product (what stacked fits and ``train.compile`` run).

The hypernetwork's costs are fixed per step, not per image, so the ratio hyper / mle falls as the batch grows.
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

from models.estimators import adam  # noqa: E402
from models.families import build_family  # noqa: E402
from models.estimators.ple import objective, penalty_entries  # noqa: E402
from models.hypernet import HyperNetwork  # noqa: E402
from tasks.generation import resolve_device  # noqa: E402
from tasks.layout import StudyPaths  # noqa: E402
from tasks.params import load  # noqa: E402
from tasks.realdata import prepare_real_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sparse-min-ratio", type=float, default=None,
                        help="override HyperNetwork.sparse_min_ratio (0: always the sparse penalty path)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    p = load(args.params, args.overrides)
    device = resolve_device(p.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        real = prepare_real_data(p, StudyPaths(Path(tmp), p.study.name)).of(p.lineages[0].name)
    data = torch.as_tensor(real.train.pixels, dtype=torch.float32, device=device)
    batch_size = min(p.train.batch_size, len(data))
    family = build_family(p.model.family, real.train.shape, p.model)
    torch.manual_seed(0)
    target = family.build().to(device)
    features = family.hyper_features(data[:2]).flatten(1).shape[1]
    hyper = HyperNetwork(target, features, list(p.ple.hidden), p.ple.rank, family.trained_parameters(target)).to(device)
    if args.sparse_min_ratio is not None:
        hyper.sparse_min_ratio = args.sparse_min_ratio
    mle_adam, hyper_adam = adam(target.parameters(), p.train.lr, device), adam(hyper.parameters(), p.train.lr, device)
    samples, picks = torch.Generator(device=device).manual_seed(1), torch.Generator(device=device).manual_seed(2)
    dims = family.nll_units()
    target.train()

    def mle(batch):
        return family.nll(target, batch).mean(), mle_adam

    def hypernet(batch, penalize=False, sparse=False):
        entries = penalty_entries(p.ple, hyper, picks, device) if penalize else None
        loss, _, _ = objective(family, target, hyper, batch, None, p.ple, dims, samples, entries, penalize,
                               allow_sparse=sparse)
        return loss, hyper_adam

    kinds = {"mle": mle, "hyper": hypernet, "penalty": lambda b: hypernet(b, True, True),
             "penalty-dense": lambda b: hypernet(b, True, False)}
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    for i in range(10 + args.steps):
        start = (i * batch_size) % (len(data) - batch_size + 1)
        batch = data[order[start:start + batch_size].to(device)]
        for kind, step in kinds.items():
            t0 = time.perf_counter()
            loss, optimizer = step(batch)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            if i >= 10:
                times[kind].append((t1 - t0, t2 - t1, t3 - t2))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}, torch {torch.__version__}")
    print(f"study: {p.data.source}, family {p.model.family} ({sum(t.numel() for t in target.parameters()):,} "
          f"weights), batch {batch_size}; hypernetwork {sum(t.numel() for t in hyper.parameters()):,} weights "
          f"(rank {p.ple.rank}), penalty on {p.ple.penalty_entries} entries; median of {args.steps} steps, ms")
    total = {}
    for kind, ts in times.items():
        parts = [1e3 * statistics.median(t[k] for t in ts) for k in range(3)]
        total[kind] = 1e3 * statistics.median(sum(t) for t in ts)
        print(f"  {kind:14s} forward {parts[0]:6.2f}  backward {parts[1]:6.2f}  adam {parts[2]:6.2f}  "
              f"step {total[kind]:6.2f}")
    every = p.ple.penalty_every
    ple_step = ((every - 1) * total["hyper"] + total["penalty"]) / every
    print(f"a PLE step on average (penalty every {every}th step): {ple_step:.2f} ms, {ple_step / total['mle']:.2f}x "
          f"an MLE step; the lambda = 0 step {total['hyper'] / total['mle']:.2f}x")


if __name__ == "__main__":
    main()
