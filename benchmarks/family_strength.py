"""Each image family's generation-0 quality and fit time at the families study's budget, side by side.

    OMP_NUM_THREADS=1 python benchmarks/family_strength.py                 # every family, seeds 0-4, one thread
    python benchmarks/family_strength.py --families diffusion gan --seeds 0 1
    python benchmarks/family_strength.py --set model.diffusion.width=256   # over the study's own params

What it runs is the families study's generation 0 by MLE (``madloop study families``, flows/studies/families.py):
the study's params (``studies.families.params`` over the built-in defaults), the family set, lineage
``mle-s<seed>`` per seed, fitted on the real training set with the seed the loop derives for generation 0 and
scored (FID of ``score.samples`` samples against the held-out real images, the domain classifier's features)
with the seed the loop derives for its score: the very numbers the study's generation-0 rows hold. Seeds are
the outer loop and families the inner one, so machine load hits every family alike; the fit times are the
estimator's own ``fit_seconds`` (training only), the generation time adds sampling and scoring.

It prints a markdown table: per family the mean FID and its 95% interval over the seeds (``tasks.stats``), the
ratio to the best family's mean FID, the median fit time and its ratio to the best family's, the median time
to fit, sample and score, and for context the mean precision, recall, minority share, memorisation rate and (a
flow) the held-out real images' bits per dimension.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.studies import study_params  # noqa: E402
from tasks.generation import fit_model, open_lineage, resolve_device  # noqa: E402
from tasks.layout import StudyPaths  # noqa: E402
from tasks.params import load, parse_override, set_dotted, validate  # noqa: E402
from tasks.study import Study  # noqa: E402
from tasks.seeds import FIT, SCORE, derive_seed  # noqa: E402
from tasks.stats import interval  # noqa: E402


EXTRA = {"precision": "precision", "recall": "recall", "minority_share": "minority share",
         "memorisation_rate": "memorised", "bpd": "held-out bits/dim"}  # means over the seeds, for context


def cell(values: list[float]) -> str:
    """The mean of a column's values, or a dash where the family has no such column."""
    finite = [v for v in values if math.isfinite(v)]
    return f"{statistics.fmean(finite):.3f}" if finite else "-"


def family_params(project, family: str, seeds: list[int], overrides: list[str]):
    """The families study's params for ``family`` (its own ``params`` over the defaults), ``--set`` on top."""
    sub = study_params(project, project.studies.families, f"strength-{family}", [{"name": f"mle-s{s}", "estimator": "mle", "seed": s}
                                                             for s in seeds], 1)
    sub["model"]["family"] = family
    for text in overrides:
        set_dotted(sub, *parse_override(text))
    return validate(sub)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="KEY=VALUE over the study's params (every family)")
    parser.add_argument("--families", nargs="+", default=None, help="default: studies.families.families")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: studies.families.seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--workdir", default=None, help="keep the real data and the classifier here (default: a "
                                                        "temporary folder)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    project = load(args.params, studies=True)
    cfg = project.studies.families
    families = args.families or list(cfg.families)
    seeds = args.seeds if args.seeds is not None else list(cfg.seeds)
    params = {f: family_params(project, f, seeds, args.overrides) for f in families}
    first = params[families[0]]
    device = resolve_device(first.device)
    fid: dict[str, list[float]] = {f: [] for f in families}
    other: dict[str, dict[str, list[float]]] = {f: {m: [] for m in EXTRA} for f in families}
    fit_s: dict[str, list[float]] = {f: [] for f in families}
    gen_s: dict[str, list[float]] = {f: [] for f in families}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        study = Study.open(first, root, check=False)  # one real draw and scorer for every family
        real, scorer = study.real, study.scorer
        lineages = {(f, s): open_lineage(params[f], f"mle-s{s}", StudyPaths(root, f"strength-{f}"), real, scorer,
                                         device) for f in families for s in seeds}
        for seed in seeds:
            for family in families:
                lineage = lineages[(family, seed)]
                started = time.perf_counter()
                model = fit_model(lineage, lineage.real.train, derive_seed(lineage.seed, 0, FIT))
                _, metrics = scorer.evaluate(model, derive_seed(lineage.seed, 0, SCORE))
                gen_s[family].append(time.perf_counter() - started)
                fit_s[family].append(model.info["fit_seconds"])
                fid[family].append(metrics["fid"])
                for m in EXTRA:
                    other[family][m].append(metrics.get(m, float("nan")))
                print(f"seed {seed} {family}: fid {metrics['fid']:.2f}, fit {model.info['fit_seconds']:.2f} s, "
                      f"fit + sample + score {gen_s[family][-1]:.2f} s", file=sys.stderr, flush=True)

    best_fid = min(statistics.fmean(v) for v in fid.values())
    best = min(families, key=lambda f: statistics.fmean(fid[f]))
    best_fit = statistics.median(fit_s[best])
    t = first.train
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, {args.threads} "
          f"torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, device {device}")
    print(f"budget: {first.data.source}, {len(real.of('mle-s' + str(seeds[0])).train)} training rows (majority {first.data.majority}, minority "
          f"{first.data.minority}), {t.epochs} epochs at batch {t.batch_size}, lr {t.lr}; MLE, generation 0; "
          f"seeds {seeds}; FID of {first.score.samples} samples"
          + (f"; --set {' '.join(args.overrides)}" if args.overrides else ""))
    print()
    print("| family | FID, mean [95% interval] | FID / best | fit (median) | fit / best family's | "
          "fit + sample + score (median) | " + " | ".join(EXTRA.values()) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(EXTRA))
    for family in families:
        mean, low, high = interval(fid[family])
        fit = statistics.median(fit_s[family])
        print(f"| {family} | {mean:.2f} [{low:.2f}, {high:.2f}] | {mean / best_fid:.2f}x | {fit:.2f} s | "
              f"{fit / best_fit:.2f}x | {statistics.median(gen_s[family]):.2f} s | "
              + " | ".join(cell(other[family][m]) for m in EXTRA) + " |")
    print()
    print(f"best family by mean FID: {best}; per seed FID: "
          + "; ".join(f"{f} {', '.join(f'{v:.2f}' for v in fid[f])}" for f in families))


if __name__ == "__main__":
    main()
