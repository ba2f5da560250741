"""Table 1 (§5.1): fairness of the VAE, majority 3 vs minority 6, at several imbalance ratios.

One generation of the main loop per ratio, estimator and training seed (their datasets DVC-tracked like any
study's, all in the MLflow experiment table1); per-class FID, R_Fair and the generated minority share,
summarized over seeds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, NonNegativeInt

from flows.loop import self_consuming_loop
from flows.studies import (STUDIES, PaperStudy, StudyRun, fmt, loop_generations, loop_params, num,
                           pyplot, read_csv, run_time, style, timing)
from models.registry import Settings
from tasks.reports import columns_of
from tasks.stats import summarize
from tasks.storage import write_atomic, write_csv_atomic


class Table1Settings(Settings):
    """Fairness (§5.1): the VAE on majority 3 vs minority 6 at several imbalance ratios."""

    ratios: list[float] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 2])
    estimators: list[str] = Field(default_factory=lambda: ["mle", "ple"])


@STUDIES.register("table1", settings={"studies.table1": Table1Settings})
class Table1(PaperStudy):
    """Table 1: per-class FID, R_Fair and the generated minority share at several imbalance ratios, MLE vs PLE."""

    order = 30
    params = ("data", "model", "train", "ple", "classifier", "score")

    @classmethod
    def run(cls, study: StudyRun) -> dict[str, Any]:
        cfg, p, started_at = study.settings, study.params, time.time()
        rows, studies = [], [f"table1-ri{ratio:g}" for ratio in cfg.ratios]
        for ratio, name in zip(cfg.ratios, studies):
            sub = loop_params(p, name, cfg.estimators, cfg.seeds, 1, imbalance_ratio=ratio)
            sub["tracking"]["experiment"] = "table1"
            for row in self_consuming_loop(params=sub, root=str(study.project), overwrite=True):
                rows.append({"ratio": ratio, **row})
        summary = summarize(rows, ["ratio", "estimator"], [c.name for c in columns_of(p)])
        write_csv_atomic(study.folder / "table1_runs.csv", rows)
        write_csv_atomic(study.folder / "table1.csv", summary)
        write_atomic(study.folder / "table1.md", lambda tmp: tmp.write_text(table1_markdown(summary)))
        figure(summary, study.folder / "table1.png")
        return loop_generations(study.project, studies, started_at)

    @classmethod
    def section(cls, folder: Path) -> list[str]:
        return section(folder)


def table1_markdown(summary: list[dict]) -> str:
    def cell(s, k):
        value, sd = s[k], s[f"{k}_sd"]
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.3g} ± {sd:.2g}" if math.isfinite(sd) else f"{value:.3g}"

    head = ("| R_I | estimator | FID | FID majority | FID minority | R_Fair | minority share generated "
            "| minority share training | runs with R_Fair defined |")
    lines = [head, "|" + "---|" * 9]
    for s in sorted(summary, key=lambda s: (s["ratio"], s["estimator"])):
        lines.append(f"| {s['ratio']:g} | {s['estimator']} | {cell(s, 'fid')} | {cell(s, 'fid_majority')} | "
                     f"{cell(s, 'fid_minority')} | {cell(s, 'r_fair')} | {cell(s, 'minority_share')} | "
                     f"{s['minority_share_train']:.3f} | {s['r_fair_defined']}/{s['runs']} |")
    return "\n".join(lines) + "\n\nMean ± standard deviation over training seeds.\n"



def figure(summary: list[dict], path: Path) -> None:
    """R_Fair vs R_I (with R_Fair = R_I, procedurally fair, and R_Fair = 1, fair) and the generated minority
    share vs the training share, per estimator; error bars: standard deviation over seeds."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ratios = sorted({s["ratio"] for s in summary})
    for estimator in dict.fromkeys(s["estimator"] for s in summary):
        sel = sorted((s for s in summary if s["estimator"] == estimator), key=lambda s: s["ratio"])
        color, label = style(estimator)
        x = np.array([s["ratio"] for s in sel])
        left.errorbar(x, [s["r_fair"] for s in sel], yerr=[s["r_fair_sd"] for s in sel], color=color,
                      marker="o", capsize=3, label=label)
        right.errorbar([s["minority_share_train"] for s in sel], [s["minority_share"] for s in sel],
                       yerr=[s["minority_share_sd"] for s in sel], color=color, marker="o", capsize=3, label=label)
    left.plot(ratios, ratios, "k--", lw=0.8, label="R_Fair = R_I (procedurally fair)")
    left.axhline(1.0, color="k", lw=0.8, label="R_Fair = 1 (fair)")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("imbalance ratio R_I")
    left.set_ylabel("R_Fair = FID_min / FID_maj")
    left.legend(frameon=False, fontsize=8)
    shares = [1 / (1 + r) for r in ratios]
    right.plot(shares, shares, "k--", lw=0.8, label="as in training")
    right.set_xlabel("minority share in training")
    right.set_ylabel("minority share of generated images")
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def section(folder: Path) -> list[str]:
    summary = read_csv(folder / "table1.csv")
    t = timing(folder)
    out = ["## Table 1: fairness of the VAE, majority 3 vs minority 6 (§5.1)", "", "![Table 1](table1/table1.png)", "",
           f"`madloop study table1`: digits, one generation per imbalance ratio, estimator and training seed. "
           f"{run_time(t)}.", "",
           (folder / "table1.md").read_text().strip(), ""]
    closer, lower = [], []
    for ratio in sorted({num(s["ratio"]) for s in summary}):
        by = {s["estimator"]: num(s["r_fair"]) for s in summary if num(s["ratio"]) == ratio}
        if math.isfinite(by.get("mle", math.nan)) and math.isfinite(by.get("ple", math.nan)):
            closer.append((ratio, abs(math.log(by["ple"])) < abs(math.log(by["mle"])), by))
        if math.isfinite(by.get("ple", math.nan)):
            lower.append((ratio, by["ple"] < ratio))
    wins = sum(1 for _, ok, _ in closer if ok)
    out += ["Paper: PLE's R_Fair is much closer to 1 than MLE's, more so as R_I grows, and below R_I.",
            "Ours: PLE's R_Fair is closer to 1 (in log ratio) than MLE's at "
            f"{wins} of {len(closer)} ratios where both are defined ("
            + ", ".join(f"R_I {fmt(r)}: MLE {fmt(b['mle'])} vs PLE {fmt(b['ple'])}" for r, _, b in closer)
            + f"); PLE's R_Fair is below R_I at {sum(ok for _, ok in lower)} of {len(lower)} ratios. "
            + ("This agrees with the paper." if closer and wins > len(closer) / 2 else
               "This does not reproduce the paper's claim."),
            "R_Fair is undefined (n/a) when a model generates fewer minority images than score.min_class_samples; "
            "the table counts how many runs had it defined. Minority shares compare the generated class mix with "
            "the training one (App. I)."]
    return out
