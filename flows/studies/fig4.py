"""Fig. 4 / 5 (§5.3, App. H.3): MADness of parameter estimates of six distributions.

Estimate, draw n points from the estimate, re-estimate, for G generations and S seeds at once (one [S, n] array
per generation), with MLE, closed-form PLE and the data-driven PLE hypernetwork, and the same hypernetwork
trained with lambda = 0 (the control).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from flows.studies import STUDIES, PaperStudy, StudyRun, fmt, num, progress, pyplot, read_csv, style, ticker, timing
from models.batched import apply_estimator, train_amortized_ple
from models.families.analytic import Exponential, Gaussian, Geometric, Laplace, Pareto, Uniform
from models.registry import Settings
from models.scalar import ScalarFamily
from tasks import as_task
from tasks.storage import write_csv_atomic

DISTRIBUTIONS = {cls.name: cls for cls in (Uniform, Gaussian, Laplace, Geometric, Exponential, Pareto)}
# The parameter each Fig. 4 panel shows (the others are in the CSV too).
MAIN_PARAMETER = {"uniform": "a", "gaussian": "std", "laplace": "scale", "geometric": "p", "exponential": "rate",
                  "pareto": "b"}
Progress = Callable[[int, int], None] | None


class Fig4Settings(Settings):
    """MADness of parameter estimates (§5.3, App. H.3): estimate, sample n from the estimate, re-estimate."""

    generations: PositiveInt = 50
    seeds: PositiveInt = 1000
    pareto_seeds: PositiveInt = 100  # as the paper
    distributions: list[Literal["uniform", "gaussian", "laplace", "geometric", "exponential", "pareto"]] = Field(
        default_factory=lambda: ["uniform", "gaussian", "laplace", "geometric", "exponential", "pareto"])
    sizes: dict[str, PositiveInt] = Field(default_factory=lambda: {
        "uniform": 20, "gaussian": 20, "laplace": 25, "geometric": 25, "exponential": 25, "pareto": 25})
    # the data-driven PLE: one hypernetwork per distribution, trained on simulated datasets (models/batched.py)
    lam: float = Field(1.0, ge=0.0)
    m: PositiveInt = 100
    penalty: Literal["mean", "per_set"] = "mean"
    steps: PositiveInt = 1500
    batch: PositiveInt = 32
    lr: PositiveFloat = 3e-3
    hidden: list[PositiveInt] = Field(default_factory=lambda: [16, 16])
    head_hidden: list[PositiveInt] = Field(default_factory=lambda: [16])
    spread: float = Field(10.0, gt=1.0)  # training box: truth x/÷ spread (scales), +-spread sd (locations)


def valid(family: ScalarFamily, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep estimates inside the family's domain so a collapsed lineage stays collapsed instead of crashing
    the sampler (a variance of exactly 0, a rate of inf): scales in [1e-12, 1e12], probabilities in (0, 1)."""
    out = {}
    for name, value in params.items():
        value = np.nan_to_num(np.asarray(value, dtype=np.float64), nan=1e-12, posinf=1e12, neginf=-1e12)
        if name == "p":
            out[name] = np.clip(value, 1e-9, 1 - 1e-9)
        elif name in ("mean", "loc"):
            out[name] = np.clip(value, -1e12, 1e12)
        else:
            out[name] = np.clip(value, 1e-12, 1e12)
    return out


def run_lineages(family: ScalarFamily, estimate: Callable[[np.ndarray], dict], n: int, seeds: int, generations: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Parameters of ``seeds`` independent lineages over ``generations``: name -> array [G, S]."""
    rng = np.random.default_rng(seed)
    truth = {k: np.full(seeds, v) for k, v in family.true_estimates().items()}
    x = family.draw_batch(truth, n, rng)
    history: dict[str, list[np.ndarray]] = {k: [] for k in truth}
    for _ in range(generations):
        params = valid(family, estimate(x))
        for name in history:
            history[name].append(params[name])
        x = family.draw_batch(params, n, rng)
    return {name: np.stack(values) for name, values in history.items()}


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


def madness_curves(distribution: str, *, n: int, seeds: int, generations: int, lam: float, m: int, penalty: str,
                   steps: int, batch: int, lr: float, hidden, head_hidden, spread: float, seed: int = 0,
                   progress: Progress = None) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Fig. 4 rows for one distribution: per estimator, parameter and generation, the mean, its standard error,
    the median and quartiles across seeds; calibration rows; the seconds each part took.

    Estimators: ``mle``; ``ple_closed`` where the paper derives it; ``ple``, the hypernetwork trained with the
    penalty; and ``hyper_nopenalty``, the same hypernetwork trained on the same datasets with lambda = 0. The
    last one is the control: whatever keeps it from collapsing (its training box, its architecture) is not the
    penalty's doing."""
    family = DISTRIBUTIONS[distribution].of()
    seconds: dict[str, float] = {}
    estimators: dict[str, Callable[[np.ndarray], dict]] = {"mle": lambda x: family.closed_mle(x, 0)}
    if family.has_closed_ple:
        estimators["ple_closed"] = lambda x: family.closed_ple(x, 0)
    if distribution != "uniform":  # the paper's uniform panel is the closed form (App. H.3, subfigure 1)
        for name, weight in (("ple", lam), ("hyper_nopenalty", 0.0)):
            started = time.perf_counter()
            hyper = train_amortized_ple(family, n, lam=weight, m=m, penalty=penalty, steps=steps, batch=batch, lr=lr,
                                        hidden=hidden, head_hidden=head_hidden, spread=spread, seed=seed,
                                        progress=progress if name == "ple" else None)
            seconds[f"train_{name}"] = time.perf_counter() - started
            estimators[name] = (lambda h: lambda x: apply_estimator(h, x))(hyper)
    truth = family.true_estimates()
    rows = []
    started = time.perf_counter()
    for name, estimate in estimators.items():
        history = run_lineages(family, estimate, n, seeds, generations, seed + 1)  # same data streams: paired
        for parameter, values in history.items():
            q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75], axis=1)
            for g in range(generations):
                rows.append({"distribution": distribution, "parameter": parameter, "estimator": name,
                             "generation": g, "mean": float(values[g].mean()),
                             "sem": float(values[g].std(ddof=1) / math.sqrt(seeds)), "median": float(median[g]),
                             "q25": float(q25[g]), "q75": float(q75[g]), "seeds": seeds, "n": n,
                             "truth": truth[parameter]})
    seconds["loops"] = time.perf_counter() - started
    return rows, calibration(family, estimators, n, seeds, seed), seconds



def figure(rows: list[dict], path: Path) -> None:
    """One panel per distribution: its main parameter vs generation; mean +- standard error (band) and median
    (dashed) across seeds, per estimator; the truth as a black line."""
    distributions = list(dict.fromkeys(r["distribution"] for r in rows))
    cols = min(3, len(distributions))
    rows_n = math.ceil(len(distributions) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
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
        truth = sel[0]["truth"]
        ax.axhline(truth, color="k", lw=0.8)
        if param != "p":  # scales and rates drift multiplicatively: a log axis, clipped to truth x/÷ 30
            ax.set_yscale("log")
            ax.set_ylim(truth / 30, truth * 30)
        ax.set_title(f"{dist} (n={sel[0]['n']}, {sel[0]['seeds']} seeds): {param}")
        ax.set_xlabel("generation")
    for ax in list(axes.flat)[len(distributions):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)



def section(folder: Path) -> list[str]:
    rows = read_csv(folder / "fig4.csv")
    t = timing(folder)
    main = MAIN_PARAMETER
    last_g = max(int(r["generation"]) for r in rows)
    seeds = {r["distribution"]: r["seeds"] for r in rows}
    out = ["## Fig. 4: MADness of parameter estimates (§5.3, App. H.3)", "",
           "![Fig. 4](fig4/fig4.png)", "",
           f"`madloop study fig4`: {last_g + 1} generations; seeds per distribution: "
           + ", ".join(f"{d} {s}" for d, s in seeds.items())
           + f". Run time **{t.get('seconds', 'n/a')} s** on {t.get('machine', 'n/a')} (target: under 600 s).",
           "", "Mean across seeds at the last generation (truth in the last column); "
           "`ple` is the data-driven hypernetwork, `hyper_nopenalty` the same hypernetwork trained with lambda = 0 "
           "(the control), `ple_closed` the paper's closed form.", "",
           "| distribution | parameter | mle | ple_closed | ple | hyper_nopenalty | truth |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    slopes = calibration_slopes(folder / "fig4_calibration.csv")
    for dist, param in main.items():
        sel = {r["estimator"]: r for r in rows if r["distribution"] == dist and r["parameter"] == param
               and int(r["generation"]) == last_g}
        if not sel:
            continue
        truth = num(next(iter(sel.values()))["truth"])
        value = {e: num(r["mean"]) for e, r in sel.items()}
        out.append(f"| {dist} | {param} | " + " | ".join(fmt(value.get(e, math.nan))
                                                         for e in ("mle", "ple_closed", "ple", "hyper_nopenalty"))
                   + f" | {fmt(truth)} |")
        err = {e: abs(v - truth) for e, v in value.items()}
        for variant in (e for e in ("ple_closed", "ple") if e in err):
            ok = err[variant] < err["mle"]
            notes = ""
            if variant == "ple" and "hyper_nopenalty" in err:
                notes += (" The lambda = 0 control ends as close or closer, so the penalty is not what holds it."
                          if err["hyper_nopenalty"] <= err["ple"] else
                          " The lambda = 0 control drifts further, so the penalty is doing work.")
            if variant == "ple" and slopes.get((dist, "ple"), 1.0) < 0.5:
                notes += (f" But this estimator barely follows the truth (calibration slope "
                          f"{fmt(slopes[(dist, 'ple')], 2)}; 1 is ideal), so its stability is no evidence.")
            verdicts.append(f"- **{dist}** ({param}), {variant}: MLE ends at {fmt(value['mle'])}, {variant} at "
                            f"{fmt(value[variant])}, truth {fmt(truth)}: "
                            f"{'agrees with' if ok else 'does not reproduce'} the claim that PLE stays closer to "
                            f"the truth than MLE.{notes}")
    n_uniform = next((int(r["n"]) for r in rows if r["distribution"] == "uniform"), None)
    if n_uniform:
        theory = (n_uniform / (n_uniform + 1)) ** (last_g + 1)
        out += ["", f"Paper: \"MLE's estimate of a for U[0,1], n = {n_uniform}, falls to about "
                    f"({n_uniform}/{n_uniform + 1})^g; PLE stays near 1.\" Theory at g = {last_g + 1}: "
                    f"{fmt(theory)}."]
    calibration = folder / "fig4_calibration.csv"
    if calibration.is_file():
        cal = read_csv(calibration)
        out += ["", "Does the hypernetwork track the truth, or only the middle of its training box? Mean estimate "
                    "over fresh datasets drawn at other true values (`fig4_calibration.csv`):", "",
                "| distribution | true value | mle | ple | hyper_nopenalty |", "|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["distribution"], r["true_value"]) for r in cal))
        for dist, value in keys:
            est = {r["estimator"]: num(r["mean_estimate"]) for r in cal
                   if r["distribution"] == dist and r["true_value"] == value}
            out.append(f"| {dist} | {fmt(num(value))} | {fmt(est.get('mle', math.nan))} | "
                       f"{fmt(est.get('ple', math.nan))} | {fmt(est.get('hyper_nopenalty', math.nan))} |")
    return out + ["", "Verdicts (rule: closer to the truth than MLE at the last generation, by the mean):", *verdicts]


def calibration_slopes(path: Path) -> dict[tuple[str, str], float]:
    """(distribution, estimator) -> d(mean estimate) / d(true value) between the lowest and highest true value."""
    if not path.is_file():
        return {}
    rows = read_csv(path)
    out = {}
    for key in {(r["distribution"], r["estimator"]) for r in rows}:
        sel = sorted((num(r["true_value"]), num(r["mean_estimate"])) for r in rows
                     if (r["distribution"], r["estimator"]) == key)
        (x0, y0), (x1, y1) = sel[0], sel[-1]
        out[key] = (y1 - y0) / (x1 - x0) if x1 != x0 else math.nan
    return out


madness_curves_task = as_task(madness_curves)


@STUDIES.register("fig4", settings={"studies.fig4": Fig4Settings})
class Fig4(PaperStudy):
    """Fig. 4 / 5: MLE vs PLE estimates of six distributions over generations, across seeds."""

    order = 10


    @classmethod
    def run(cls, study: StudyRun) -> dict[str, Any]:
        cfg, p = study.settings, study.params
        rows, checks, seconds = [], [], {}
        with progress() as bar:
            for dist in cfg.distributions:
                seeds = cfg.pareto_seeds if dist == "pareto" else cfg.seeds
                dist_rows, dist_checks, dist_seconds = madness_curves_task(
                    dist, n=cfg.sizes[dist], seeds=seeds, generations=cfg.generations, lam=cfg.lam, m=cfg.m,
                    penalty=cfg.penalty, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, hidden=cfg.hidden,
                    head_hidden=cfg.head_hidden, spread=cfg.spread, seed=p.seed,
                    progress=ticker(bar, f"fig4 {dist}: training the PLE hypernetwork"))
                rows += dist_rows
                checks += dist_checks
                seconds[dist] = {k: round(v, 1) for k, v in dist_seconds.items()}
                study.logger.info(f"fig4 {dist}: {seconds[dist]}")
        write_csv_atomic(study.folder / "fig4.csv", rows)
        write_csv_atomic(study.folder / "fig4_calibration.csv", checks)
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
