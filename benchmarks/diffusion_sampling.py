"""The diffusion family's sampler against full sampling: FID of the same MLE models under several samplers.

    python benchmarks/diffusion_sampling.py                         # default params.yaml, seeds 0 1 2
    python benchmarks/diffusion_sampling.py --seeds 0 --set train.epochs=100

Each seed fits generation 0 (MLE on the real training set, as the loop does), then scores it (1,000 samples,
the image scorer's FID, precision and recall) with each sampler: (DDIM steps, eta); 1000 steps with eta 1 is
DDPM's full ancestral sampler.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.generation import fit_model, resolve_device  # noqa: E402
from tasks.params import load  # noqa: E402
from tasks.study import Study  # noqa: E402

SAMPLERS = [(100, 0.0), (1000, 0.0), (1000, 1.0), (100, 1.0), (20, 0.0), (4, 0.0), (2, 0.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    p = load(args.params, args.overrides + ["model.family=diffusion", "lineages=[mle]"])
    device = resolve_device(p.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        study = Study.open(p, Path(tmp), check=False)
        lineage, scorer = study.lineage("mle"), study.scorer
        settings = lineage.family.settings
        for seed in args.seeds:
            model = fit_model(lineage, lineage.real.train, seed)
            for steps, eta in SAMPLERS:
                settings.sample_steps, settings.eta = steps, eta
                started = time.perf_counter()
                _, m = scorer.evaluate(model, 100 + seed)
                print(f"seed {seed}, DDIM {steps} steps, eta {eta}: fid {m['fid']:.2f}  precision "
                      f"{m['precision']:.3f}  recall {m['recall']:.3f}  ({time.perf_counter() - started:.1f} s to "
                      f"sample and score)", flush=True)


if __name__ == "__main__":
    main()
