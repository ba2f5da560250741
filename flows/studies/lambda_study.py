"""The lambda study: PLE's penalty tested where it acts. One generation of the main loop on digits and on mnist5k at
R_I = 10, five seeds, PLE over a log grid of lambda from 0.01 to 1e6 in the code's units (NLL per pixel, penalty
per emitted weight) and in the paper's literal ones (the batch's NLL, the L1 norm over the weights; docs/ple.md),
beside three controls under the same seeds: MLE, the same hypernetwork at lambda = 0 (``hyper_nopenalty``: what
the penalty adds) and MLE through the hypernetwork's factorised head with a fixed input (``mle_factorised``: what
the parameterisation alone does, so that a gain of the lambda = 0 hypernetwork over MLE can be put on H reading its
input or on the parameterisation).

Per run: FID, minority FID, minority share, the KID ratio (KID minority / KID majority), the training NLL per image
(nats, the same computation for every estimator: the negative ELBO of the real training set under fixed noise), and
the penalty's three diagnostics that every PLE fit records (``models.estimators.ple.diagnostics``): its share of
the objective's value, its share of the gradient, and H's input dependence ||H(3s) - H(6s)|| / ||H(all)||.

Pre-registered claims (rules in :func:`claims`, written before any number of this study existed): (a) there is a
lambda where PLE beats both MLE and the control; (b) as lambda grows PLE converges to MLE; (c) the lambda = 0
hypernetwork's gain in minority share is H reading its input, not the parameterisation.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, PositiveFloat, model_validator

from flows.loop import self_consuming_loop
from flows.studies import (MNIST5K_TRAIN, PAPER_VAE_DIGITS, PAPER_VAE_MNIST, STUDIES, Claim, LoopStudySettings,
                           PaperStudy, StudyRun, fmt, loop_generations, num, pyplot, read_csv, run_time, seed_lineages,
                           study_params, style, timing, verdict_from)
from models.families import build_family
from models.penalty import literal_factor
from models.registry import Settings
from tasks.datasets import read_parquet
from tasks.generation import load_generation_model, load_model, resolve_device
from tasks.layout import StudyPaths, generation_files
from tasks.params import validate
from tasks.realdata import real_train_file
from tasks.stats import holm, interval, paired
from tasks.storage import read_manifest, write_csv_atomic

GRID = [0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]
CONTROLS = ["mle", "hyper_nopenalty", "mle_factorised"]
LITERAL = {"ple.nll_reduction": "sum", "ple.penalty_reduction": "sum"}  # the paper's literal units
# each metric's scale for its interval over seeds (tasks.stats): positive and skewed, or a share
SCALES = {"fid": "log", "fid_minority": "log", "kid_ratio": "log", "gradient_share": "log",
          "input_dependence": "log", "minority_share": "unit", "penalty_share": "unit"}
DIAGNOSTICS = ("penalty_share", "gradient_share", "input_dependence")
LOG_METRICS = ("gradient_share", "input_dependence")  # spanning decades: log axes in the figure
METRICS = ("fid", "fid_minority", "minority_share", "kid_ratio", "nll", *DIAGNOSTICS)
LABELS = {"fid": "FID", "fid_minority": "FID minority", "minority_share": "minority share",
          "kid_ratio": "KID ratio (min / maj)", "nll": "training NLL (nats / image)",
          "penalty_share": "penalty's share of the value", "gradient_share": "penalty's share of the gradient",
          "input_dependence": "H's input dependence"}


class LambdaDataset(LoopStudySettings):
    """One dataset of the lambda study: its seeds, its controls and the loop's params (over the defaults)."""

    estimators: list[str] = Field(default_factory=lambda: list(CONTROLS), min_length=1)


class LambdaSettings(Settings):
    """PLE over a log grid of lambda in both units, beside MLE and two controls, on each dataset at one R_I."""

    ratio: PositiveFloat = 10.0  # R_I
    lams: list[PositiveFloat] = Field(default_factory=lambda: list(GRID))  # in the code's units
    paper_lams: list[PositiveFloat] = Field(default_factory=lambda: list(GRID))  # in the paper's literal units
    # Claim (b)'s tolerances, stated before the numbers: a fit "still fits" while its training NLL is within
    # nll_tolerance of MLE's (relative), and PLE "is MLE" when every metric's paired difference from MLE lies
    # within +- tolerance of MLE's mean and H's input dependence is below tolerance x the control's.
    tolerance: PositiveFloat = 0.1
    nll_tolerance: PositiveFloat = 0.1
    datasets: dict[str, LambdaDataset] = Field(default_factory=lambda: {
        "digits": LambdaDataset(params={"model": {"vae": dict(PAPER_VAE_DIGITS)}}),
        "mnist5k": LambdaDataset(params={
            "data": {"source": "mnist5k"}, "model": {"vae": dict(PAPER_VAE_MNIST)}, "train": dict(MNIST5K_TRAIN),
            "classifier": {"arch": "resnet", "channels": [16, 32], "epochs": 15}})}, min_length=1)

    @model_validator(mode="after")
    def valid_grid(self) -> "LambdaSettings":
        if not self.lams and not self.paper_lams:
            raise ValueError("lams, paper_lams: at least one lambda to sweep")
        for label in self.datasets:
            if not label.replace("_", "").isalnum():
                raise ValueError(f"datasets: {label!r} is not a plain name (letters, digits, _)")
        return self


def lam_label(lam: float) -> str:
    """lambda in a lineage name: 0.01, 1, 1e6 (no '+', which names may not hold)."""
    return f"{lam:g}".replace("e+0", "e").replace("e+", "e")


def groups(cfg: LambdaSettings) -> dict[str, dict[str, Any]]:
    """The PLE recipes of the sweep by group name: ple-code-<lambda> and ple-paper-<lambda>."""
    out = {f"ple-code-{lam_label(lam)}": {"estimator": "ple", "set": {"ple.lam": lam}} for lam in cfg.lams}
    out.update({f"ple-paper-{lam_label(lam)}": {"estimator": "ple", "set": {"ple.lam": lam, **LITERAL}}
                for lam in cfg.paper_lams})
    return out


@STUDIES.register("lambda", settings={"studies.lambda": LambdaSettings})
class LambdaStudy(PaperStudy):
    """PLE's penalty where it acts: a lambda sweep into the regime where the penalty dominates, in both units, with
    MLE, the lambda = 0 hypernetwork and MLE through H's head (fixed input) beside it."""

    order = 35
    title = "The lambda study"

    @classmethod
    def run(cls, study: StudyRun) -> dict[str, Any]:
        cfg, p, started_at = study.settings, study.params, time.time()
        recipes = groups(cfg)
        rows, names = [], []
        for label, dataset in cfg.datasets.items():
            name = f"{study.name}-{label}"
            sub = study_params(p, dataset, name, seed_lineages(dataset.estimators, dataset.seeds, **recipes), 1,
                               imbalance_ratio=cfg.ratio)
            sub["tracking"]["experiment"] = study.name
            loop_rows = self_consuming_loop(params=sub, root=str(study.project), overwrite=True)
            rows += run_rows(validate(sub), StudyPaths(study.project, name), label, recipes, loop_rows)
            names.append(name)
        write_csv_atomic(study.folder / "lambda_runs.csv", rows)
        summary = summary_rows(rows)
        write_csv_atomic(study.folder / "lambda.csv", summary)
        figure(summary, study.folder / "lambda.png")
        return {**loop_generations(study.project, names, started_at), "ratio": cfg.ratio,
                "tolerance": cfg.tolerance, "nll_tolerance": cfg.nll_tolerance}  # into timing.json, for the section

    @classmethod
    def section(cls, folder: Path) -> list[str]:
        return section(folder)


# --- one row per run ------------------------------------------------------------------------------------------------


def run_rows(p, paths: StudyPaths, dataset: str, recipes: dict[str, dict], loop_rows: list[dict]) -> list[dict]:
    """Each lineage's row: its recipe (group, units, lambda and lambda in code units), its metrics, the penalty's
    diagnostics from its manifest, and its training NLL per image (of the lineage's own real draw)."""
    device = resolve_device(p.device)
    real = read_parquet(paths.real / real_train_file(p, p.lineage(loop_rows[0]["lineage"])))
    family = build_family(p.model.family, real.shape, p.model)
    module = family.build()
    weights = sum(t.numel() for t in family.trained_parameters(module).values())
    factor = literal_factor(weights, min(p.train.batch_size, len(real)), family.nll_units())
    out = []
    for row in loop_rows:
        lineage = row["lineage"]
        group, seed = lineage.rsplit("-s", 1)
        pixels = read_parquet(paths.real / real_train_file(p, p.lineage(lineage))).pixels
        recipe = recipes.get(group, {})
        lam = recipe.get("set", {}).get("ple.lam", 0.0 if group in ("hyper_nopenalty", "mle_factorised") else math.nan)
        units = "-" if not recipe else "paper" if "ple.nll_reduction" in recipe["set"] else "code"
        info = read_manifest(paths.lineage(lineage) / generation_files(0)["manifest"]).get("info", {})
        kid_min, kid_maj = num(row.get("kid_minority", math.nan)), num(row.get("kid_majority", math.nan))
        out.append({"dataset": dataset, "group": group, "estimator": row["estimator"], "units": units, "lam": lam,
                    "lam_code": lam * factor if units == "paper" else lam, "literal_factor": factor,
                    "seed": int(seed), "fid": row.get("fid", math.nan),
                    "fid_minority": row.get("fid_minority", math.nan),
                    "fid_majority": row.get("fid_majority", math.nan),
                    "minority_share": row.get("minority_share", math.nan), "r_fair": row.get("r_fair", math.nan),
                    "kid_ratio": kid_min / kid_maj if kid_maj > 0 else math.nan,
                    "nll": training_nll(family, paths.lineage(lineage), pixels, device),
                    **{k: info.get(k, 0.0 if k in DIAGNOSTICS else math.nan)
                       for k in (*DIAGNOSTICS, "penalty_gradient_ratio", "input_split")}})
    return out


@torch.no_grad()
def training_nll(family, folder: Path, pixels: np.ndarray, device: torch.device, seed: int = 0) -> float:
    """Generation 0's model's NLL per image of the real training set (nats; a VAE's negative ELBO), the same
    computation for every estimator: the saved weights, eval mode, fixed noise (its own random stream)."""
    model = load_model(family, load_generation_model(folder, 0), device)
    model.module.eval()
    x = torch.as_tensor(pixels, dtype=torch.float32, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return float(torch.cat([family.nll(model.module, x[i:i + 1024]) for i in range(0, len(x), 1024)]).mean())


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per dataset and group: centre and 95% interval over seeds of every metric, by its scale (tasks.stats)."""
    out = []
    for key in dict.fromkeys((r["dataset"], r["group"]) for r in rows):
        sel = [r for r in rows if (r["dataset"], r["group"]) == key]
        entry = {"dataset": key[0], "group": key[1], "units": sel[0]["units"], "lam": sel[0]["lam"],
                 "lam_code": sel[0]["lam_code"], "seeds": len(sel)}
        for metric in METRICS:
            mean, low, high = interval([num(r[metric]) for r in sel], SCALES.get(metric, "linear"))
            entry.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
        out.append(entry)
    return out


# --- the figure -----------------------------------------------------------------------------------------------------


def figure(summary: list[dict], path: Path) -> None:
    """Per dataset (rows) and metric (columns): PLE vs lambda in code units (circles: the code-unit runs; squares:
    the paper-unit runs at their code-unit equivalent), mean and 95% interval over seeds; the controls as
    horizontal lines with their intervals as bands."""
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    metrics = ("fid", "fid_minority", "minority_share", "nll", "gradient_share", "input_dependence")
    plt = pyplot()
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(3.6 * len(metrics), 3.2 * len(datasets)),
                             squeeze=False)
    for row, dataset in zip(axes, datasets):
        for ax, metric in zip(row, metrics):
            for units, marker in (("code", "o"), ("paper", "s")):
                sel = sorted((s for s in summary if s["dataset"] == dataset and s["units"] == units),
                             key=lambda s: s["lam_code"])
                if sel:
                    y = np.array([s[metric] for s in sel])
                    low = np.array([s[f"{metric}_low"] for s in sel])
                    if metric in LOG_METRICS:  # a log axis: an interval reaching below 0 is drawn down to y / 100
                        low = np.where(np.isfinite(low) & (low > 0), low, y / 100)
                    err = [y - low, np.array([s[f"{metric}_high"] for s in sel]) - y]
                    ax.errorbar([s["lam_code"] for s in sel], y, yerr=err, marker=marker, capsize=2, lw=1,
                                color="tab:blue" if units == "code" else "tab:cyan", label=f"PLE, {units} units")
            for control in CONTROLS:
                s = next((s for s in summary if s["dataset"] == dataset and s["group"] == control), None)
                if s is not None and math.isfinite(s[metric]) and (metric not in LOG_METRICS or s[metric] > 0):
                    color, label = style(control)
                    ax.axhline(s[metric], color=color, lw=1, label=label)
                    if math.isfinite(s[f"{metric}_low"]) and metric not in LOG_METRICS:
                        ax.axhspan(s[f"{metric}_low"], s[f"{metric}_high"], color=color, alpha=0.15, lw=0)
            ax.set(xscale="log", xlabel="lambda (code units)", title=f"{dataset}: {LABELS[metric]}")
            if metric in LOG_METRICS:
                ax.set_yscale("log")
        row[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- claims ---------------------------------------------------------------------------------------------------------


def by_seed(rows: list[dict], dataset: str, group: str, metric: str) -> dict[int, float]:
    return {int(r["seed"]): num(r[metric]) for r in rows if r["dataset"] == dataset and r["group"] == group}


def compare(rows: list[dict], dataset: str, a: str, b: str, metric: str):
    """Paired over seeds: metric of a minus metric of b."""
    x, y = by_seed(rows, dataset, a, metric), by_seed(rows, dataset, b, metric)
    seeds = sorted(set(x) & set(y))
    return paired([x[s] for s in seeds], [y[s] for s in seeds])


def ple_groups(rows: list[dict], dataset: str, units: str | None = None) -> list[str]:
    """The dataset's PLE groups (one units, or both), in increasing lambda (code units)."""
    sel = {r["group"]: num(r["lam_code"]) for r in rows if r["dataset"] == dataset and r["estimator"] == "ple"
           and (units is None or r["units"] == units)}
    return sorted(sel, key=sel.get)


def claim_a(rows: list[dict], metric: str, better: str) -> Claim:
    """(a) there is a lambda where PLE beats both MLE and the lambda = 0 control on ``metric``."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    sign = -1.0 if better == "lower" else 1.0  # sign x (PLE - other) > 0: PLE better
    favours = lambda t: sign * t.mean  # noqa: E731
    interval_favours = lambda t: t.low > 0 if sign > 0 else t.high < 0  # noqa: E731
    found, hinted, evidence = {}, {}, []
    for dataset in datasets:
        names = ple_groups(rows, dataset)
        if not names:
            evidence.append(f"{dataset}: no PLE runs")
            found[dataset], hinted[dataset] = [], []
            continue
        tests = {o: [compare(rows, dataset, g, o, metric) for g in names] for o in ("mle", "hyper_nopenalty")}
        adjusted = {o: holm([t.p for t in tests[o]]) for o in tests}
        found[dataset] = [g for i, g in enumerate(names)
                          if all(favours(tests[o][i]) > 0 and adjusted[o][i] < 0.05 for o in tests)]
        hinted[dataset] = [g for i, g in enumerate(names) if all(interval_favours(tests[o][i]) for o in tests)]
        best = max(range(len(names)), key=lambda i: min(favours(tests[o][i]) for o in tests))
        evidence.append(f"{dataset}: Holm-significant against both at {', '.join(found[dataset]) or 'no lambda'}; "
                        f"uncorrected 95% intervals against both at {', '.join(hinted[dataset]) or 'no lambda'}; "
                        f"closest {names[best]}: vs MLE {tests['mle'][best].text()}, vs the control "
                        f"{tests['hyper_nopenalty'][best].text()}")
    verdict = ("reproduced" if datasets and all(found.values()) else
               "inconclusive" if any(found.values()) or (datasets and all(hinted.values())) else "not reproduced")
    direction = "lower" if better == "lower" else "higher"
    return Claim(
        f"(a) there is a lambda where PLE beats both MLE and the lambda = 0 control ({LABELS[metric]}, {direction} is "
        "better)",
        f"per dataset, at each lambda of the grid (both units), the paired differences over seeds of {metric}, PLE "
        "minus MLE and PLE minus the control; Holm-adjusted over the grid's lambdas, per dataset and comparator. "
        "Reproduced when on every dataset some lambda has both differences in PLE's favour with adjusted p < 0.05; "
        "inconclusive when some dataset has one, or every dataset has a lambda with both uncorrected 95% intervals in "
        "PLE's favour; otherwise not reproduced", "; ".join(evidence), verdict)


def claim_b(rows: list[dict], tolerance: float, nll_tolerance: float) -> Claim:
    """(b) as lambda grows PLE converges to MLE."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    metrics = ("fid", "fid_minority", "minority_share")
    equivalent, close, evidence = [], [], []
    for dataset in datasets:
        mle = {m: interval(list(by_seed(rows, dataset, "mle", m).values()))[0] for m in (*metrics, "nll")}
        control_dependence = interval(list(by_seed(rows, dataset, "hyper_nopenalty", "input_dependence").values()))[0]
        names = ple_groups(rows, dataset, "code")
        fitting = [g for g in names if interval(list(by_seed(rows, dataset, g, "nll").values()))[0]
                   <= mle["nll"] * (1 + nll_tolerance) + 1e-12]
        broken = [g for g in names if g not in fitting]
        if not fitting:
            evidence.append(f"{dataset}: no lambda keeps the training NLL within {nll_tolerance:.0%} of MLE's")
            equivalent.append(False)
            close.append(False)
            continue
        top = fitting[-1]
        tests = {m: compare(rows, dataset, top, "mle", m) for m in metrics}
        band = {m: tolerance * abs(mle[m]) for m in metrics}
        dependence = interval(list(by_seed(rows, dataset, top, "input_dependence").values()))[0]
        quiet = dependence <= tolerance * control_dependence
        equivalent.append(quiet and all(abs(t.low) <= band[m] and abs(t.high) <= band[m] for m, t in tests.items()))
        close.append(quiet and all(abs(t.mean) <= band[m] for m, t in tests.items()))
        evidence.append(f"{dataset}: largest lambda that still fits {top}; PLE minus MLE there: "
                        + ", ".join(f"{m} {t.text()} (band +-{fmt(band[m])})" for m, t in tests.items())
                        + f"; input dependence {fmt(dependence)} vs the control's {fmt(control_dependence)}"
                        + (f"; broken (NLL more than {nll_tolerance:.0%} above MLE's) at {', '.join(broken)}"
                           if broken else ""))
    verdict = ("reproduced" if datasets and all(equivalent) else "inconclusive" if datasets and all(close)
               else "not reproduced")
    return Claim(
        "(b) as lambda grows PLE converges to MLE",
        f"per dataset, at the largest lambda of the code-unit grid whose mean training NLL is within "
        f"{nll_tolerance:.0%} of MLE's (larger ones are reported as broken), the paired differences PLE minus MLE "
        f"of FID, minority FID and minority share must each have their 95% interval within +-{tolerance:.0%} of "
        f"MLE's mean, and H's input dependence must be below {tolerance:.0%} of the lambda = 0 control's; "
        "reproduced when that holds on every dataset, inconclusive when the mean differences are within the band (and "
        "the input dependence below it) on every dataset, otherwise not reproduced", "; ".join(evidence), verdict)


def claim_c(rows: list[dict]) -> Claim:
    """(c) the lambda = 0 hypernetwork's extra minority images come from H reading its input."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    tests = [compare(rows, d, "hyper_nopenalty", "mle_factorised", "minority_share") for d in datasets]
    context = [compare(rows, d, "mle_factorised", "mle", "minority_share") for d in datasets]
    return Claim(
        "(c) the lambda = 0 hypernetwork's minority share over MLE's comes from H reading its input, not from the "
        "parameterisation",
        "per dataset, the paired difference of minority shares, the lambda = 0 hypernetwork minus MLE through the "
        "same head with a fixed input (mle_factorised), must be > 0: reproduced when its 95% interval is above 0 on "
        "half the datasets or more and below 0 on none, inconclusive when its mean is above 0 on half or more, otherwise "
        "not reproduced (mle_factorised minus MLE is given beside it: the parameterisation's own effect)",
        "; ".join(f"{d}: {t.text()} (mle_factorised - MLE: {c.text()})" for d, t, c in zip(datasets, tests, context)),
        verdict_from(tests))


def claims(rows: list[dict], tolerance: float, nll_tolerance: float) -> list[Claim]:
    return [claim_a(rows, "fid_minority", "lower"), claim_a(rows, "minority_share", "higher"),
            claim_b(rows, tolerance, nll_tolerance), claim_c(rows)]


# --- RESULTS.md -----------------------------------------------------------------------------------------------------


def section(folder: Path) -> list[str]:
    rows = [{**r, "seed": int(r["seed"])} for r in read_csv(folder / "lambda_runs.csv")]
    summary = read_csv(folder / "lambda.csv")
    t = timing(folder)
    defaults = LambdaSettings.model_fields  # the run's tolerances (timing.json), else the stated defaults
    tolerance = num(t.get("tolerance", defaults["tolerance"].default))
    nll_tolerance = num(t.get("nll_tolerance", defaults["nll_tolerance"].default))
    out = ["## The lambda study: PLE's penalty where it acts", "", "![lambda](lambda/lambda.png)", "",
           "`madloop study lambda`: one generation of the loop per dataset, recipe and seed, at R_I = "
           f"{fmt(num(t.get('ratio', defaults['ratio'].default)))}; PLE at each lambda in the code's units "
           "(`ple-code-L`: NLL per pixel, penalty per emitted weight) and in the paper's literal units "
           "(`ple-paper-L`: the batch's NLL, the L1 norm over the weights; lambda_code = lambda_literal x P / (B x D), "
           "docs/ple.md), beside MLE, the lambda = 0 hypernetwork (`hyper_nopenalty`) and MLE through the same "
           f"factorised head with a fixed input (`mle_factorised`). {run_time(t)}.", "",
           "Mean [95% interval] over seeds. NLL: the training NLL per image in nats, one computation for every "
           "estimator. Diagnostics, recorded by every PLE fit: the penalty's share of the objective's value (last "
           "epoch), its share of the gradient (||grad lambda x penalty|| / ||grad NLL|| over H's weights, per-step "
           "minibatch gradients at the fitted H) and H's input dependence (||H(3s) - H(6s)|| / ||H(all)||).", ""]
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        out += [f"**{dataset}**", "", "| recipe | lambda | lambda (code units) | "
                + " | ".join(LABELS[m] for m in METRICS) + " |", "|" + "---|" * (3 + len(METRICS))]
        sel = [s for s in summary if s["dataset"] == dataset]
        for s in sorted(sel, key=lambda s: (s["units"] != "-", s["units"], num(s["lam_code"]))):
            cells = [f"{fmt(num(s[m]))} [{fmt(num(s[f'{m}_low']))}, {fmt(num(s[f'{m}_high']))}]" for m in METRICS]
            out.append(f"| {s['group']} | {fmt(num(s['lam']))} | {fmt(num(s['lam_code']))} | " + " | ".join(cells)
                       + " |")
        out.append("")
    out += ["Claims and verdicts (each rule stated before its numbers, when the study was written; paired over "
            "seeds; 95% t-intervals):", ""]
    for claim in claims(rows, tolerance, nll_tolerance):
        out += claim.markdown()
    return out
