"""A study's reports, from the manifests on disk (the source of truth): ``reports/<study>/``.

``generations.csv`` (``dvc plots``), ``metrics.json`` (``dvc metrics``: each lineage's last generation),
``summary.md`` and, for image studies, ``lineages.csv`` / ``lineages.md`` (recipes ranked). Which columns lead,
which the summaries show and what ranks the recipes come from the study's scorer (``tasks.scorers``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from tasks import as_task
from tasks.layout import GENERATIONS_CSV, METRICS_JSON, RANKING_CSV, RANKING_MD, SUMMARY_MD, StudyPaths
from tasks.params import LineageParams, Params, digest, lineage_recipe
from tasks.resume import manifests
from tasks.scorers import Column, scorer_class
from tasks.stats import summarize
from tasks.storage import CorruptOutputError, read_manifest, write_atomic, write_csv_atomic, write_json_atomic

KEYS = ("lineage", "estimator", "generation")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def lineage_rows(lineage: LineageParams, finished: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished generation: its metrics (sorted by name, as manifests store them) and fit time."""
    return [{"lineage": lineage.name, "estimator": lineage.estimator, "generation": m["generation"],
             **dict(sorted(m["metrics"].items())), "fit_seconds": m["info"].get("fit_seconds", math.nan)}
            for m in finished]


def collect_rows(p: Params, paths: StudyPaths, lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """Every finished generation of every lineage made under these params, read from the manifests, each checked
    against its own checksum (the files they list were verified when the run that made or resumed them started).
    A manifest that fails its check ends its lineage's rows, with a warning: the next run redoes it."""
    rows = []
    for lineage in lineages:
        recipe_hash, finished = digest(lineage_recipe(p, lineage)), []
        for k, path in manifests(paths.lineage(lineage.name)):
            try:
                manifest = read_manifest(path)
            except CorruptOutputError as err:
                warnings.warn(f"{err}; lineage {lineage.name}: generation {k} and later are left out (the next run "
                              "redoes them)")
                break
            if k >= p.loop.generations or manifest.get("recipe_hash") != recipe_hash:
                break
            finished.append(manifest)
        rows += lineage_rows(lineage, finished)
    return rows


def columns_of(p: Params) -> list[Column]:
    return scorer_class(p.model.family).columns(_family(p))


def _family(p: Params):
    from models.families import FAMILIES

    return FAMILIES.get(p.model.family)


def metric_columns(p: Params, rows: list[dict[str, Any]]) -> list[str]:
    """The scorer's headline metrics first, in its order, then whatever else the rows carry, in first-seen order."""
    seen = [k for row in rows for k in row if k not in KEYS]
    headline = [c.name for c in columns_of(p) if c.headline and c.name in seen]
    return headline + [c for c in dict.fromkeys(seen) if c not in headline]


def summary_columns(p: Params) -> list[str]:
    return [c.name for c in columns_of(p) if c.summary]


def write_reports(p: Params, paths: StudyPaths, lineages: list[LineageParams],
                  rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """generations.csv (dvc plots), metrics.json (dvc metrics: each lineage's last generation), summary.md and the
    recipe ranking. ``rows``: the lineages' rows when the caller has them (else read from the manifests)."""
    rows = collect_rows(p, paths, lineages) if rows is None else rows
    paths.reports.mkdir(parents=True, exist_ok=True)
    columns = [*KEYS, *metric_columns(p, rows)]

    write_csv_atomic(paths.reports / GENERATIONS_CSV,
                     [{c: fmt(row.get(c, math.nan)) for c in columns} for row in rows], columns)
    final = {}
    for row in rows:
        final[row["lineage"]] = {c: (None if isinstance(row.get(c), float) and not math.isfinite(row[c])
                                     else row.get(c)) for c in ["generation", *metric_columns(p, [row])]}
    write_json_atomic(paths.reports / METRICS_JSON, final)
    write_atomic(paths.reports / SUMMARY_MD, lambda tmp: tmp.write_text(markdown_table(p, rows)))
    ranking = rank_recipes(p, rows, lineages)
    if ranking:
        write_csv_atomic(paths.reports / RANKING_CSV, [{c: fmt(v) for c, v in r.items()} for r in ranking])
        write_atomic(paths.reports / RANKING_MD, lambda tmp: tmp.write_text(ranking_markdown(p, ranking)))
    return rows


def rank_recipes(p: Params, rows: list[dict[str, Any]], lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """Each recipe (a lineage, or the seeds of one) at its last generation: mean and spread over its seeds of the
    scorer's ranking metrics, ranked by its ``rank_by`` metric (lower first)."""
    by = scorer_class(p.model.family).rank_by
    if not rows or by is None or by not in rows[0]:
        return []
    metrics = [c.name for c in columns_of(p) if c.rank]
    group_of = {lineage.name: lineage.group or lineage.name for lineage in lineages}
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["generation"] >= last.get(row["lineage"], {"generation": -1})["generation"]:
            last[row["lineage"]] = row
    recipes = summarize([{**row, "recipe": group_of.get(name, name)} for name, row in last.items()],
                        ["recipe", "generation"], metrics)
    recipes.sort(key=lambda e: (math.isnan(e[by]), e[by]))
    return [{"rank": rank, "recipe": e.pop("recipe"), "seeds": e.pop("runs"), **e}
            for rank, e in enumerate(recipes, 1)]


TITLES = {"fid": "FID", "recall": "recall", "minority_share": "minority share", "r_fair": "R_Fair",
          "generation": "gen"}


def title(name: str) -> str:
    return TITLES.get(name, name)


def ranking_markdown(p: Params, ranking: list[dict[str, Any]]) -> str:
    metrics = [c.name for c in columns_of(p) if c.rank]

    def cell(entry, metric):
        value, sd = entry[metric], entry[f"{metric}_sd"]
        return "n/a" if math.isnan(value) else (f"{value:.4g} ± {sd:.2g}" if math.isfinite(sd) else f"{value:.4g}")

    head = ["rank", "recipe", "seeds", "generation", *map(title, metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {e['rank']} | {e['recipe']} | {e['seeds']} | {e['generation']} | "
              + " | ".join(cell(e, m) for m in metrics) + " |" for e in ranking]
    return "\n".join(lines) + "\n\nLast generation of each recipe; mean ± standard deviation over its seeds.\n"


def markdown_table(p: Params, rows: list[dict[str, Any]]) -> str:
    columns = ["lineage", "generation", *summary_columns(p)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, math.nan)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


write_reports_task = as_task(write_reports)
