"""The paper's evidence as Prefect flows: ``madloop study fig4 | fig3 | table1 | fig2 | results``.

Each study reads its sizes from ``studies.<name>`` in params (``--set studies.fig4.seeds=50`` for a quick run),
writes a CSV of every number and a PNG under ``reports/<name>/``, logs to the MLflow experiment ``<name>``, and
is a DVC stage (dvc.yaml), so ``dvc repro`` rebuilds the reports. Table 1 and Fig. 2 run the main
``self_consuming_loop`` flow as subflows, so their datasets are DVC-tracked like any study's.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from prefect import flow, get_run_logger
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.loop import self_consuming_loop
from tasks import as_task
from tasks import figures
from tasks.paper import gmm_cell, madness_curves, summarize
from tasks.params import Params, flatten, validate
from tasks.storage import write_atomic, write_csv_atomic, write_json_atomic
from tasks.tracking import log_study_run, tracking_uri

madness_curves_task = as_task(madness_curves)
gmm_cell_task = as_task(gmm_cell)
LOOP_METRICS = ["fid", "kid", "precision", "recall", "minority_share", "minority_share_train", "fid_majority",
                "fid_minority", "r_fair"]


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def ticker(bar: Progress, description: str) -> Callable[[int, int], None]:
    task_id = bar.add_task(description, total=None)
    return lambda done, total: bar.update(task_id, completed=done, total=total)


def machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}")


def finish(name: str, folder: Path, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    timing = {"study": name, "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_json_atomic(folder / "timing.json", timing)
    return timing


def loop_generations(project: Path, studies: list[str], started_at: float) -> dict[str, int]:
    """How many generations the loop studies hold, and how many of them an earlier run had finished (their
    manifests are older than this run), since a resumed study's run time covers only the rest."""
    manifests = [m for study in studies for m in (project / "data" / "studies" / study).glob("*/gen-*.json")]
    reused = sum(m.stat().st_mtime < started_at for m in manifests)
    return {"generations": len(manifests), "generations_reused": reused}


def study_setup(params: dict | None, root: str, name: str) -> tuple[Params, Path, Path, str]:
    p = validate(params)
    project = Path(root).resolve()
    folder = project / "reports" / name
    folder.mkdir(parents=True, exist_ok=True)
    return p, project, folder, tracking_uri(p.tracking.uri, project)


@flow(name="fig4-madness")
def fig4_flow(params: dict | None = None, root: str = ".") -> dict[str, Any]:
    """Fig. 4 / 5: MLE vs PLE estimates of six distributions over generations, across seeds."""
    logger = get_run_logger()
    p, project, folder, uri = study_setup(params, root, "fig4")
    cfg, started = p.studies.fig4, time.perf_counter()
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
            logger.info(f"fig4 {dist}: {seconds[dist]}")
    write_csv_atomic(folder / "fig4.csv", rows)
    write_csv_atomic(folder / "fig4_calibration.csv", checks)
    figures.fig4(rows, folder / "fig4.png")
    timing = finish("fig4", folder, started, {"parts": seconds})
    for dist in cfg.distributions:
        for estimator in dict.fromkeys(r["estimator"] for r in rows if r["distribution"] == dist):
            sel = [r for r in rows if r["distribution"] == dist and r["estimator"] == estimator]
            curves = {f"{stat}.{r_param}": [(r["generation"], r[stat]) for r in sel if r["parameter"] == r_param]
                      for stat in ("mean", "median") for r_param in {r["parameter"] for r in sel}}
            log_study_run(uri, "fig4", f"{dist}/{estimator}", project, flatten(cfg.model_dump()), curves,
                          {"distribution": dist, "estimator": estimator, "study": "fig4"})
    log_study_run(uri, "fig4", "fig4 report", project, flatten(cfg.model_dump()), {}, {"study": "fig4"},
                  [folder / f for f in ("fig4.csv", "fig4_calibration.csv", "fig4.png", "timing.json")])
    logger.info(f"fig4 finished in {timing['seconds']} s")
    return timing


@flow(name="fig3-gmm")
def fig3_flow(params: dict | None = None, root: str = ".") -> dict[str, Any]:
    """Fig. 3: KL_MLE - KL_PLE over minority weights x training sizes, for the two-component GMM."""
    logger = get_run_logger()
    p, project, folder, uri = study_setup(params, root, "fig3")
    cfg, started = p.studies.fig3, time.perf_counter()
    cells = []
    with progress() as bar:
        for weight in cfg.minority_weights:
            for n in cfg.sizes:
                cell = gmm_cell_task(weight, n, seeds=cfg.seeds, lam=cfg.lam, m=cfg.m, steps=cfg.steps,
                                     batch=cfg.batch, lr=cfg.lr, hidden=cfg.hidden, head_hidden=cfg.head_hidden,
                                     em_tol=cfg.em_tol, em_max_iter=cfg.em_max_iter, kl_samples=cfg.kl_samples,
                                     seed=p.seed, progress=ticker(bar, f"fig3 w={weight:g} n={n}: PLE"))
                cells.append(cell)
                logger.info(f"fig3 w={weight:g} n={n}: KL_MLE {cell['kl_mle']:.4f}  KL_PLE {cell['kl_ple']:.4f}")
    write_csv_atomic(folder / "fig3.csv", cells)
    figures.fig3(cells, folder / "fig3.png")
    timing = finish("fig3", folder, started, {})
    for weight in cfg.minority_weights:
        sel = [c for c in cells if c["minority_weight"] == weight]
        curves = {k: [(c["n"], c[k]) for c in sel] for k in ("kl_mle", "kl_ple", "kl_diff")}
        log_study_run(uri, "fig3", f"minority weight {weight:g}", project, flatten(cfg.model_dump()), curves,
                      {"minority_weight": f"{weight:g}", "study": "fig3"})
    log_study_run(uri, "fig3", "fig3 report", project, flatten(cfg.model_dump()), {}, {"study": "fig3"},
                  [folder / "fig3.csv", folder / "fig3.png", folder / "timing.json"])
    logger.info(f"fig3 finished in {timing['seconds']} s")
    return timing


def loop_params(p: Params, study: str, estimators: list[str], seeds: list[int], generations: int,
                **data: Any) -> dict[str, Any]:
    """Params of a main-loop study with one lineage per (estimator, training seed): ``<estimator>-s<seed>``."""
    sub = p.model_dump(mode="json")
    sub["study"]["name"] = study
    sub["loop"]["generations"] = generations
    sub["data"].update(data)
    sub["lineages"] = [{"name": f"{e}-s{s}", "estimator": e, "seed": s} for e in estimators for s in seeds]
    return sub


@flow(name="table1-fairness")
def table1_flow(params: dict | None = None, root: str = ".") -> dict[str, Any]:
    """Table 1: per-class FID, R_Fair and the generated minority share at several imbalance ratios, MLE vs PLE
    (one generation of the main loop per ratio, estimator and seed; all in the MLflow experiment table1)."""
    logger = get_run_logger()
    p, project, folder, uri = study_setup(params, root, "table1")
    cfg, started, started_at = p.studies.table1, time.perf_counter(), time.time()
    rows, studies = [], [f"table1-ri{ratio:g}" for ratio in cfg.ratios]
    for ratio, study in zip(cfg.ratios, studies):
        sub = loop_params(p, study, cfg.estimators, cfg.seeds, 1, imbalance_ratio=ratio)
        sub["tracking"]["experiment"] = "table1"
        for row in self_consuming_loop(params=sub, root=str(project), overwrite=True):
            rows.append({"ratio": ratio, **row})
    summary = summarize(rows, ["ratio", "estimator"], LOOP_METRICS)
    write_csv_atomic(folder / "table1_runs.csv", rows)
    write_csv_atomic(folder / "table1.csv", summary)
    write_atomic(folder / "table1.md", lambda tmp: tmp.write_text(table1_markdown(summary)))
    figures.table1(summary, folder / "table1.png")
    timing = finish("table1", folder, started, loop_generations(project, studies, started_at))
    log_study_run(uri, "table1", "table1 report", project, flatten(cfg.model_dump()), {}, {"study": "table1"},
                  [folder / f for f in ("table1.csv", "table1.md", "table1.png", "timing.json")])
    logger.info(f"table1 finished in {timing['seconds']} s")
    return timing


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


@flow(name="fig2-mad-curve")
def fig2_flow(params: dict | None = None, root: str = ".") -> dict[str, Any]:
    """Fig. 2: FID and recall vs generation of the full replace loop, MLE vs PLE, mean +- s.e. over seeds."""
    logger = get_run_logger()
    p, project, folder, uri = study_setup(params, root, "fig2")
    cfg, started, started_at = p.studies.fig2, time.perf_counter(), time.time()
    sub = loop_params(p, "fig2", cfg.estimators, cfg.seeds, cfg.generations)
    rows = self_consuming_loop(params=sub, root=str(project), overwrite=True)
    summary = summarize(rows, ["estimator", "generation"], LOOP_METRICS)
    write_csv_atomic(folder / "fig2_runs.csv", rows)
    write_csv_atomic(folder / "fig2.csv", summary)
    figures.fig2(summary, folder / "fig2.png")
    timing = finish("fig2", folder, started, loop_generations(project, ["fig2"], started_at))
    log_study_run(uri, "fig2", "fig2 report", project, flatten(cfg.model_dump()), {}, {"study": "fig2"},
                  [folder / f for f in ("fig2.csv", "fig2.png", "timing.json")])
    logger.info(f"fig2 finished in {timing['seconds']} s")
    return timing


STUDIES: dict[str, Callable[..., dict[str, Any]]] = {
    "fig4": fig4_flow, "fig3": fig3_flow, "table1": table1_flow, "fig2": fig2_flow,
}


def run(name: str, p: Params, root: Path) -> dict[str, Any]:
    return STUDIES[name](params=p.model_dump(mode="json"), root=str(root))

