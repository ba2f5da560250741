"""Fig. 4 / 5 (§5.3, App. H.3): MADness of parameter estimates of six distributions.

Estimate, draw n points from the estimate, re-estimate, for G generations and S seeds at once (one [S, n] array
per generation). Estimators: MLE (closed form), PLE in closed form where the paper derives it, the data-driven PLE
hypernetwork at the paper's settings (lambda = 0.1, Eq. 5's per-set penalty), the same hypernetwork with
lambda = 0 (the control) and a named sensitivity run (lambda = 1, the penalty on the mean of the m synthetic sets).

Each seed's lineage starts from its own truth, drawn from the middle of the hypernetworks' training box, so no
estimator profits from where the truth sits; values are reported relative to each seed's truth (a ratio for
scales and rates, an error in true standard deviations for locations, a logit error for probabilities). Every
seed's first and last estimate are saved (``fig4_seeds.parquet``). All estimators share the random stream of a
seed (common random numbers: paired comparisons; the Gaussian closed forms are then exact rescalings of each
other, one piece of evidence, not two).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt
from scipy import special

from flows.studies import (STUDIES, Claim, PaperStudy, StudyRun, fmt, num, progress, pyplot, read_csv, style, ticker,
                           timing, verdict_from)
from models.batched import apply_estimator, train_amortized_ple
from models.families.analytic import Exponential, Gaussian, Geometric, Laplace, Pareto, Uniform
from models.registry import Settings
from models.scalar import ScalarFamily
from tasks import as_task
from tasks.stats import paired
from tasks.storage import write_atomic, write_csv_atomic

DISTRIBUTIONS = {cls.name: cls for cls in (Uniform, Gaussian, Laplace, Geometric, Exponential, Pareto)}
# The parameter each Fig. 4 panel shows and its verdict uses (the others are in the CSV and tables too).
MAIN_PARAMETER = {"uniform": "a", "gaussian": "std", "laplace": "scale", "geometric": "p", "exponential": "rate",
                  "pareto": "b"}
NORMALIZED = {"scale": "estimate / truth", "rate": "estimate / truth", "location": "(estimate - truth) / true scale",
              "probability": "logit(estimate) - logit(truth)"}
Progress = Callable[[int, int], None] | None


class Variant(BaseModel):
    """A data-driven hypernetwork: its name in the reports, lambda and the penalty's form."""

    name: str
    lam: float = Field(ge=0.0)
    penalty: Literal["mean", "per_set"] = "per_set"


class Fig4Settings(Settings):
    """MADness of parameter estimates (§5.3, App. H.3): estimate, sample n from the estimate, re-estimate."""

    generations: PositiveInt = 50
    seeds: PositiveInt = 1000
    pareto_seeds: PositiveInt = 100  # as the paper
    distributions: list[Literal["uniform", "gaussian", "laplace", "geometric", "exponential", "pareto"]] = Field(
        default_factory=lambda: list(DISTRIBUTIONS))
    sizes: dict[str, PositiveInt] = Field(default_factory=lambda: {
        "uniform": 20, "gaussian": 20, "laplace": 25, "geometric": 25, "exponential": 25, "pareto": 25})
    # the data-driven hypernetworks: PLE at the paper's settings, the lambda = 0 control, a sensitivity run
    variants: list[Variant] = Field(default_factory=lambda: [
        Variant(name="ple", lam=0.1, penalty="per_set"), Variant(name="hyper_nopenalty", lam=0.0),
        Variant(name="ple_lam1_mean", lam=1.0, penalty="mean")])
    m: PositiveInt = 100  # synthetic sets per dataset (paper)
    steps: PositiveInt = 1500  # training of each hypernetwork
    batch: PositiveInt = 32  # datasets per step
    lr: PositiveFloat = 3e-3
    hidden: list[PositiveInt] = Field(default_factory=lambda: [16, 16])
    head_hidden: list[PositiveInt] = Field(default_factory=lambda: [16])
    spread: float = Field(10.0, gt=1.0)  # training box: truth x/÷ spread (scales), +- spread sd (locations)
    truth_spread: float = Field(3.0, gt=1.0)  # each seed's truth: drawn from this narrower box around the truth


def valid(family: ScalarFamily, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep estimates inside the family's domain so a collapsed lineage stays collapsed instead of crashing
    the sampler (a variance of exactly 0, a rate of inf): scales in [1e-12, 1e12], probabilities in (0, 1)."""
    out = {}
    for name, value in params.items():
        value = np.nan_to_num(np.asarray(value, dtype=np.float64), nan=1e-12, posinf=1e12, neginf=-1e12)
        role = family.roles.get(name, "scale")
        out[name] = np.clip(value, 1e-9, 1 - 1e-9) if role == "probability" else \
            np.clip(value, -1e12, 1e12) if role == "location" else np.clip(value, 1e-12, 1e12)
    return out


def draw_truths(family: ScalarFamily, seeds: int, spread: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A truth per seed, uniform over ``family.prior_box(spread)`` (log-uniform for scales and rates)."""
    out = {}
    for name, (low, high, scale) in family.prior_box(spread).items():
        u = rng.random(seeds)
        out[name] = np.exp(np.log(low) + u * (np.log(high) - np.log(low))) if scale == "log" else low + u * (high - low)
    return out


def run_lineages(family: ScalarFamily, estimate: Callable[[np.ndarray], dict], n: int, truths: dict[str, np.ndarray],
                 generations: int, seed: int) -> dict[str, np.ndarray]:
    """Parameters of one lineage per seed (truth ``truths[name][s]``) over ``generations``: name -> [G, S]."""
    rng = np.random.default_rng(seed)
    x = family.draw_batch(truths, n, rng)
    history: dict[str, list[np.ndarray]] = {k: [] for k in truths}
    for _ in range(generations):
        params = valid(family, estimate(x))
        for name in history:
            history[name].append(params[name])
        x = family.draw_batch(params, n, rng)
    return {name: np.stack(values) for name, values in history.items()}


def normalize(family: ScalarFamily, name: str, values: np.ndarray, truths: dict[str, np.ndarray]) -> np.ndarray:
    """Estimates relative to each seed's truth (``NORMALIZED`` says how, by the parameter's role)."""
    role = family.roles.get(name, "scale")
    if role == "location":
        scale = next(truths[k] for k, r in family.roles.items() if r == "scale")
        return (values - truths[name]) / scale
    if role == "probability":
        return special.logit(values) - special.logit(truths[name])
    return values / truths[name]


def error(family: ScalarFamily, name: str, normalized: np.ndarray) -> np.ndarray:
    """Distance from the truth of normalized values: |log ratio| for scales and rates, |value| otherwise."""
    return np.abs(np.log(normalized)) if family.roles.get(name, "scale") in ("scale", "rate") else np.abs(normalized)


def calibration(family: ScalarFamily, estimators: dict[str, Callable], n: int, seeds: int, seed: int) -> list[dict]:
    """Does an estimator track the truth, or just return the middle of its training box? Mean estimate of the
    main parameter over ``seeds`` fresh datasets drawn at half, once and twice its true value (p: 0.25/0.5/0.75)."""
    name = MAIN_PARAMETER[family.name]
    truth = family.true_estimates()
    values = [0.25, 0.5, 0.75] if name == "p" else [truth[name] / 2, truth[name], truth[name] * 2]
    rng = np.random.default_rng([seed, 7])
    rows = []
    for value in values:
        x = family.draw_batch({**{k: np.full(seeds, v) for k, v in truth.items()}, name: np.full(seeds, value)}, n,
                              rng)
        for estimator, estimate in estimators.items():
            rows.append({"distribution": family.name, "parameter": name, "estimator": estimator,
                         "true_value": value, "mean_estimate": float(np.mean(valid(family, estimate(x))[name]))})
    return rows


def madness_curves(distribution: str, *, n: int, seeds: int, generations: int, variants: list[dict], m: int,
                   steps: int, batch: int, lr: float, hidden, head_hidden, spread: float, truth_spread: float,
                   seed: int = 0, progress: Progress = None) -> dict[str, Any]:
    """One distribution: per estimator, parameter and generation the mean, standard error, median and quartiles
    over seeds of the normalized estimates; every seed's first and last estimate; calibration rows; seconds."""
    family = DISTRIBUTIONS[distribution].of()
    seconds: dict[str, float] = {}
    estimators: dict[str, Callable[[np.ndarray], dict]] = {"mle": lambda x: family.closed_mle(x, 0)}
    if family.has_closed_ple:
        estimators["ple_closed"] = lambda x: family.closed_ple(x, 0)
    if distribution != "uniform":  # the paper's uniform panel is the closed form (App. H.3, subfigure 1)
        for variant in variants:
            started = time.perf_counter()
            hyper = train_amortized_ple(family, n, lam=variant["lam"], m=m, penalty=variant["penalty"], steps=steps,
                                        batch=batch, lr=lr, hidden=hidden, head_hidden=head_hidden, spread=spread,
                                        seed=seed, progress=progress if variant["name"] == "ple" else None)
            seconds[f"train_{variant['name']}"] = time.perf_counter() - started
            estimators[variant["name"]] = (lambda h: lambda x: apply_estimator(h, x))(hyper)
    truths = draw_truths(family, seeds, truth_spread, np.random.default_rng([seed, 5]))
    rows, per_seed = [], []
    started = time.perf_counter()
    for name, estimate in estimators.items():
        history = run_lineages(family, estimate, n, truths, generations, seed + 1)  # same streams: paired
        for parameter, values in history.items():
            normalized = normalize(family, parameter, values, truths)
            q25, median, q75 = np.quantile(normalized, [0.25, 0.5, 0.75], axis=1)
            role = family.roles.get(parameter, "scale")
            for g in range(generations):
                rows.append({"distribution": distribution, "parameter": parameter, "estimator": name,
                             "generation": g, "normalized": NORMALIZED[role],
                             "target": 1.0 if role in ("scale", "rate") else 0.0,
                             "mean": float(normalized[g].mean()),
                             "sem": float(normalized[g].std(ddof=1) / math.sqrt(seeds)),
                             "median": float(median[g]), "q25": float(q25[g]), "q75": float(q75[g]), "seeds": seeds,
                             "n": n})
            per_seed += [{"distribution": distribution, "parameter": parameter, "estimator": name, "seed": s,
                          "truth": float(truths[parameter][s]), "first": float(values[0, s]),
                          "last": float(values[-1, s]), "normalized_last": float(normalized[-1, s])}
                         for s in range(seeds)]
    seconds["loops"] = time.perf_counter() - started
    return {"rows": rows, "per_seed": per_seed, "seconds": seconds,
            "calibration": calibration(family, estimators, n, seeds, seed)}


madness_curves_task = as_task(madness_curves)


# --- theory: the closed forms' first check ---------------------------------------------------------------------


def theory(n_uniform: int, n_gaussian: int, generations: int) -> list[dict]:
    """What theory predicts, per generation g = 0 .. G-1 (model g is fitted on data drawn from model g-1), for the
    closed forms, relative to the truth:

    - uniform MLE max(X): E[a_g] = (n/(n+1))^(g+1); closed-form PLE (n+1)/n max(X) is unbiased at each step, so
      E[a_g] = 1 (a martingale), while E[log a_g] falls by 1/n - log((n+1)/n) per generation: its median drifts
      down (log a_g is a random walk with negative drift);
    - Gaussian MLE variance: E[s_g^2] = ((n-1)/n)^(g+1); the unbiased variance (closed-form PLE) keeps
      E[s_g^2] = 1, but E[log s_g^2] falls by log((n-1)/2) - psi((n-1)/2) per generation, so the median of s_g
      decays as exp(-(g+1) d / 2) (to first order, the median of a sum of many log-factors is its mean).
    """
    u_drift = math.log((n_uniform + 1) / n_uniform) - 1 / n_uniform
    g_drift = float(special.digamma((n_gaussian - 1) / 2) + math.log(2 / (n_gaussian - 1)))  # E log(chi2/(n-1))
    out = []
    for g in range(generations):
        out += [{"distribution": "uniform", "estimator": "mle", "parameter": "a", "generation": g,
                 "mean": (n_uniform / (n_uniform + 1)) ** (g + 1), "median": math.exp((g + 1) * -1 / n_uniform)},
                {"distribution": "uniform", "estimator": "ple_closed", "parameter": "a", "generation": g,
                 "mean": 1.0, "median": math.exp((g + 1) * u_drift)},
                {"distribution": "gaussian", "estimator": "ple_closed", "parameter": "std", "generation": g,
                 "mean": math.nan, "median": math.exp((g + 1) * g_drift / 2)},
                {"distribution": "gaussian", "estimator": "ple_closed", "parameter": "variance", "generation": g,
                 "mean": 1.0, "median": math.nan},
                {"distribution": "gaussian", "estimator": "mle", "parameter": "variance", "generation": g,
                 "mean": ((n_gaussian - 1) / n_gaussian) ** (g + 1), "median": math.nan}]
    return out


@STUDIES.register("fig4", settings={"studies.fig4": Fig4Settings})
class Fig4(PaperStudy):
    """Fig. 4 / 5: MLE vs PLE estimates of six distributions over generations, across seeds."""

    order = 10

    @classmethod
    def run(cls, study: StudyRun) -> dict[str, Any]:
        cfg, p = study.settings, study.params
        rows, checks, per_seed, seconds = [], [], [], {}
        with progress() as bar:
            for dist in cfg.distributions:
                out = madness_curves_task(
                    dist, n=cfg.sizes[dist], seeds=cfg.pareto_seeds if dist == "pareto" else cfg.seeds,
                    generations=cfg.generations, variants=[v.model_dump() for v in cfg.variants], m=cfg.m,
                    steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, hidden=cfg.hidden, head_hidden=cfg.head_hidden,
                    spread=cfg.spread, truth_spread=cfg.truth_spread, seed=p.seed,
                    progress=ticker(bar, f"fig4 {dist}: training the PLE hypernetwork"))
                rows += out["rows"]
                checks += out["calibration"]
                per_seed += out["per_seed"]
                seconds[dist] = {k: round(v, 1) for k, v in out["seconds"].items()}
                study.logger.info(f"fig4 {dist}: {seconds[dist]}")
        write_csv_atomic(study.folder / "fig4.csv", rows)
        write_csv_atomic(study.folder / "fig4_calibration.csv", checks)
        write_atomic(study.folder / "fig4_seeds.parquet",
                     lambda tmp: pd.DataFrame(per_seed).to_parquet(tmp, index=False, compression="zstd"))
        write_csv_atomic(study.folder / "fig4_theory.csv",
                         theory(cfg.sizes["uniform"], cfg.sizes["gaussian"], cfg.generations))
        figure(rows, study.folder / "fig4.png")
        for dist in cfg.distributions:
            for estimator in dict.fromkeys(r["estimator"] for r in rows if r["distribution"] == dist):
                sel = [r for r in rows if r["distribution"] == dist and r["estimator"] == estimator]
                curves = {f"{stat}.{param}": [(r["generation"], r[stat]) for r in sel if r["parameter"] == param]
                          for stat in ("mean", "median") for param in {r["parameter"] for r in sel}}
                study.log(f"{dist}/{estimator}", curves, {"distribution": dist, "estimator": estimator})
        return {"parts": seconds}

    @classmethod
    def section(cls, folder: Path) -> list[str]:
        return section(folder)


def figure(rows: list[dict], path: Path) -> None:
    """One panel per distribution: its main parameter relative to each seed's truth vs generation; mean +-
    standard error (band) and median (dashed) across seeds, per estimator; the target (the truth) as a line."""
    distributions = list(dict.fromkeys(r["distribution"] for r in rows))
    cols = min(3, len(distributions))
    rows_n = math.ceil(len(distributions) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.8 * cols, 3.6 * rows_n), squeeze=False)
    for ax, dist in zip(axes.flat, distributions):
        param = MAIN_PARAMETER[dist]
        sel = [r for r in rows if r["distribution"] == dist and r["parameter"] == param]
        for estimator in dict.fromkeys(r["estimator"] for r in sel):
            line = sorted((r for r in sel if r["estimator"] == estimator), key=lambda r: r["generation"])
            g = np.array([r["generation"] for r in line])
            mean, sem, median = (np.array([r[k] for r in line]) for k in ("mean", "sem", "median"))
            color, label = style(estimator)
            ax.plot(g, mean, color=color, label=f"{label}: mean +- s.e.")
            ax.fill_between(g, mean - sem, mean + sem, color=color, alpha=0.25, lw=0)
            ax.plot(g, median, color=color, ls="--", lw=1, label=f"{label}: median")
        target = sel[0]["target"]
        ax.axhline(target, color="k", lw=0.8, label="truth")
        if target == 1.0:  # ratios drift multiplicatively: a log axis, clipped to x/÷ 30
            ax.set_yscale("log")
            ax.set_ylim(1 / 30, 30)
        ax.set_title(f"{dist} (n={sel[0]['n']}, {sel[0]['seeds']} seeds): {param}")
        ax.set_xlabel("generation")
        ax.set_ylabel(sel[0]["normalized"].replace("estimate", param))
    for ax in list(axes.flat)[len(distributions):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- RESULTS.md ------------------------------------------------------------------------------------------------


def claims(per_seed: pd.DataFrame) -> list[Claim]:
    """Per distribution: does PLE stay closer to the truth than MLE at the last generation, and is the penalty
    what does it (PLE vs the lambda = 0 control)? Paired over seeds (same truth, same random stream)."""
    out = []
    for dist, frame in per_seed.groupby("distribution", sort=False):
        family = DISTRIBUTIONS[dist].of()
        param = MAIN_PARAMETER[dist]
        sel = frame[frame.parameter == param]
        err = {e: error(family, param, g.sort_values("seed").normalized_last.to_numpy())
               for e, g in sel.groupby("estimator")}
        ple = "ple" if "ple" in err else "ple_closed"
        rule = (f"the paired difference over seeds of the distance to the truth at the last generation "
                f"({'|log(estimate / truth)|' if family.roles[param] in ('scale', 'rate') else '|error|'} of {param}), "
                "the other estimator's minus PLE's, must be > 0: reproduced when its 95% interval is above 0, partly "
                "when only its mean is, otherwise not reproduced")
        for other, who in (("mle", "MLE"), ("hyper_nopenalty", "the lambda = 0 control")):
            if other not in err:
                continue
            test = paired(err[other], err[ple])
            out.append(Claim(f"{dist}: {ple} stays closer to the truth than {who}", rule, test.text(),
                             verdict_from([test])))
    return out


def section(folder: Path) -> list[str]:
    rows = read_csv(folder / "fig4.csv")
    per_seed = pd.read_parquet(folder / "fig4_seeds.parquet")
    t = timing(folder)
    last_g = max(int(r["generation"]) for r in rows)
    seeds = {r["distribution"]: r["seeds"] for r in rows}
    out = ["## Fig. 4: MADness of parameter estimates (§5.3, App. H.3)", "", "![Fig. 4](fig4/fig4.png)", "",
           f"`madloop study fig4`: {last_g + 1} generations; seeds per distribution: "
           + ", ".join(f"{d} {s}" for d, s in seeds.items())
           + f". Run time **{t.get('seconds', 'n/a')} s** on {t.get('machine', 'n/a')} (target: under 600 s).", "",
           "Each seed has its own truth, drawn from the middle of the hypernetworks' training box, and every value is "
           "relative to it. `ple` is the data-driven hypernetwork at the paper's settings (lambda = 0.1, Eq. 5's "
           "per-set penalty); `hyper_nopenalty` the same hypernetwork trained with lambda = 0 (the control); "
           "`ple_lam1_mean` a sensitivity run (lambda = 1, the penalty on the mean of the m synthetic sets); "
           "`ple_closed` the paper's closed form. The hypernetworks are equivariant to each family's symmetry "
           "(location and scale), as the MLEs are, so the control can learn the MLE.", "",
           "At the last generation, every estimator and parameter: mean ± standard error, and median (IQR), of the "
           "value relative to the truth (`fig4_seeds.parquet` holds every seed's first and last estimate):", "",
           "| distribution | parameter | relative value | estimator | mean ± s.e. | median (IQR) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if int(r["generation"]) == last_g:
            out.append(f"| {r['distribution']} | {r['parameter']} | {r['normalized']} (truth: {fmt(num(r['target']))}) "
                       f"| {r['estimator']} | {fmt(num(r['mean']))} ± {fmt(num(r['sem']), 2)} | "
                       f"{fmt(num(r['median']))} ({fmt(num(r['q25']))} to {fmt(num(r['q75']))}) |")
    theory_path = folder / "fig4_theory.csv"
    if theory_path.is_file():
        out += ["", "Theory first: the closed forms at the last generation, predicted vs measured (relative to the "
                    "truth). The uniform MLE shrinks as (n/(n+1))^g; the unbiased closed forms (uniform (n+1)/n max, "
                    "Gaussian unbiased variance) keep the mean of a (of sigma^2) at the truth, but not the median, "
                    "which drifts down: log a_g (log s_g^2) is a random walk with negative drift.", "",
                "| distribution | estimator | quantity | predicted | measured |", "|---|---|---|---|---|"]
        measured = {(r["distribution"], r["estimator"], r["parameter"]): r for r in rows
                    if int(r["generation"]) == last_g}
        last_seed = per_seed.groupby(["distribution", "estimator", "parameter"])
        for th in read_csv(theory_path):
            if int(th["generation"]) != last_g:
                continue
            key = (th["distribution"], th["estimator"], th["parameter"])
            if th["parameter"] == "variance":
                sel = last_seed.get_group((key[0], key[1], "std")) if (key[0], key[1], "std") in last_seed.groups \
                    else None
                if sel is not None and math.isfinite(num(th["mean"])):
                    ratio = (sel["last"] / sel["truth"]) ** 2
                    out.append(f"| {key[0]} | {key[1]} | mean of sigma^2 | {fmt(num(th['mean']))} | "
                               f"{fmt(ratio.mean())} ± {fmt(ratio.std(ddof=1) / math.sqrt(len(ratio)), 2)} |")
                continue
            if key in measured:
                for stat in ("mean", "median"):
                    if math.isfinite(num(th[stat])):
                        m = measured[key]
                        shown = f"{fmt(num(m[stat]))}" + (f" ± {fmt(num(m['sem']), 2)}" if stat == "mean" else "")
                        out.append(f"| {key[0]} | {key[1]} | {stat} of {key[2]} | {fmt(num(th[stat]))} | {shown} |")
    calibration = folder / "fig4_calibration.csv"
    if calibration.is_file():
        cal = read_csv(calibration)
        estimators = list(dict.fromkeys(r["estimator"] for r in cal))
        out += ["", "Does each estimator track the truth? Mean estimate over fresh datasets drawn at other true values "
                    "(`fig4_calibration.csv`):", "",
                "| distribution | true value | " + " | ".join(estimators) + " |",
                "|---|---|" + "---|" * len(estimators)]
        for dist, value in dict.fromkeys((r["distribution"], r["true_value"]) for r in cal):
            est = {r["estimator"]: num(r["mean_estimate"]) for r in cal
                   if r["distribution"] == dist and r["true_value"] == value}
            out.append(f"| {dist} | {fmt(num(value))} | " + " | ".join(fmt(est.get(e, math.nan)) for e in estimators)
                       + " |")
    out += ["", "Claims and verdicts (each rule stated before its numbers; paired over seeds):", ""]
    for claim in claims(per_seed):
        out += claim.markdown()
    return out
