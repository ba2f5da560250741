"""A study's reports, from the manifests on disk (the source of truth): ``reports/<study>/``.

``generations.csv`` and ``recipes.csv`` (``dvc plots``; a recipe run over several seeds is one row per generation
with the mean and a 95% t-interval over its seeds), ``metrics.json`` (``dvc metrics``: each lineage's last
generation, its summary scores), ``summary.md`` and, for image studies, ``lineages.csv`` / ``lineages.md`` (recipes ranked, each metric
with a 95% t-interval over seeds and tested against the study's first recipe) and ``recipes.png`` (every recipe's
FID and minority share over the generations). Which columns lead, which the summaries show and what ranks the
recipes come from the study's scorer (``tasks.scorers``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from tasks import as_task
from tasks.layout import (GENERATIONS_CSV, LABELLER_JSON, METRICS_JSON, RANKING_CSV, RANKING_MD, REAL, RECIPES_CSV, RECIPES_PNG,
                          SUMMARY_MD, StudyPaths)
from tasks.params import LineageParams, Params, ParamsError, digest, lineage_recipe, lineage_seed, set_dotted, validate
from tasks.resume import manifests
from tasks.scorers import Column, scorer_class
from tasks.stats import SCALE_NOTE, SIGNIFICANCE, holm, interval, paired, summarize, welch
from tasks.storage import (CorruptOutputError, read_json, read_manifest, write_atomic, write_csv_atomic,
                           write_json_atomic)

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


def scales_of(p: Params) -> dict[str, str]:
    """metric -> its kind of quantity (``tasks.stats``), which decides its interval over seeds."""
    return {c.name: c.scale for c in columns_of(p)}


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
                  rows: list[dict[str, Any]] | None = None, labeller: dict[str, float] | None = None
                  ) -> list[dict[str, Any]]:
    """generations.csv (dvc plots), metrics.json (dvc metrics: each lineage's last generation, its summary scores),
    summary.md and the recipe ranking. ``rows``: the lineages' rows when the caller has them (else read from the
    manifests); ``labeller``: the image scorer's check of its labeller (labeller.json; else the one written before)."""
    rows = collect_rows(p, paths, lineages) if rows is None else rows
    paths.reports.mkdir(parents=True, exist_ok=True)
    if labeller:
        write_json_atomic(paths.reports / LABELLER_JSON, labeller)
    elif (paths.reports / LABELLER_JSON).is_file():
        labeller = read_json(paths.reports / LABELLER_JSON)
    columns = [*KEYS, *metric_columns(p, rows)]

    write_csv_atomic(paths.reports / GENERATIONS_CSV,
                     [{c: fmt(row.get(c, math.nan)) for c in columns} for row in rows], columns)
    write_json_atomic(paths.reports / METRICS_JSON, final_metrics(p, rows))
    recipes = recipe_summary(p, rows, lineages)
    write_csv_atomic(paths.reports / RECIPES_CSV, recipe_csv_rows(p, rows, recipes))
    write_atomic(paths.reports / SUMMARY_MD,
                 lambda tmp: tmp.write_text(labeller_markdown(labeller) + summary_markdown(p, rows, recipes)))
    ranking = rank_recipes(p, rows, lineages)
    if ranking:
        write_csv_atomic(paths.reports / RANKING_CSV, [{c: fmt(v) for c, v in r.items()} for r in ranking])
        write_atomic(paths.reports / RANKING_MD, lambda tmp: tmp.write_text(ranking_markdown(p, ranking)))
        write_atomic(paths.reports / RECIPES_PNG, lambda tmp: recipes_figure(p, rows, lineages, tmp))
    return rows


def recipe_hashes(p: Params) -> dict[str, str]:
    """recipe -> a digest of the recipes (params) of its lineages: what a recipe's summary run was made from."""
    members: dict[str, list[str]] = {}
    for spec in p.lineages:
        members.setdefault(spec.group or spec.name, []).append(digest(lineage_recipe(p, spec)))
    return {recipe: digest(sorted(hashes)) for recipe, hashes in members.items()}


def final_metrics(p: Params, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """metrics.json (``dvc metrics show``, ``dvc exp show``): each lineage's last generation, its summary scores
    (the terminal table's columns, FID first) and which generation that is; undefined scores are null. Only those:
    every score of every generation is in generations.csv, and a column per score per lineage made these screens
    unreadable (``dvc exp show`` draws one column per value)."""
    final = {}
    for row in rows:
        columns = [c for c in summary_columns(p) if c in row] + ["generation"]
        final[row["lineage"]] = {c: (None if isinstance(row[c], float) and not math.isfinite(row[c]) else row[c])
                                 for c in columns}
    return final


def rank_recipes(p: Params, rows: list[dict[str, Any]], lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """Each recipe (a lineage, or the seeds of one) at its last generation: per ranking metric of the scorer, its
    centre over its seeds with a 95% interval (``{m}_low``, ``{m}_high``; ``tasks.stats.interval`` by the metric's
    scale) and its difference from the baseline
    recipe (:func:`compare_with_baseline`); ranked by the scorer's ``rank_by`` metric (lower first)."""
    by = scorer_class(p.model.family).rank_by
    if not rows or by is None or by not in rows[0]:
        return []
    metrics = [c.name for c in columns_of(p) if c.rank]
    group_of = {lineage.name: lineage.group or lineage.name for lineage in lineages}
    last = last_rows(rows)
    per_recipe = recipe_seeds(p, last, lineages)
    recipes = summarize([{**row, "recipe": group_of.get(name, name)} for name, row in last.items()],
                        ["recipe", "generation"], metrics, scales_of(p))
    baseline = group_of.get(lineages[0].name, lineages[0].name) if lineages else None
    compare_with_baseline(recipes, per_recipe, baseline, metrics)
    recipes.sort(key=lambda e: (math.isnan(e[by]), e[by]))
    ranking = []
    for rank, e in enumerate(recipes, 1):
        recipe, seeds = e.pop("recipe"), e.pop("runs")
        ranking.append({"rank": rank, "recipe": recipe, "seeds": seeds,
                        "baseline": "yes" if recipe == baseline else "", **e})
    return ranking


def last_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each lineage's row of its last finished generation."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["generation"] >= last.get(row["lineage"], {"generation": -1})["generation"]:
            last[row["lineage"]] = row
    return last


def recipe_seeds(p: Params, last: dict[str, dict[str, Any]],
                 lineages: list[LineageParams]) -> dict[str, dict[int, dict[str, Any]]]:
    """recipe -> {lineage seed: that lineage's last row}: what pairs two recipes seed by seed."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for lineage in lineages:
        if lineage.name in last:
            out.setdefault(lineage.group or lineage.name, {})[lineage_seed(p, lineage)] = last[lineage.name]
    return out


def compare_with_baseline(recipes: list[dict[str, Any]], per_recipe: dict[str, dict[int, dict[str, Any]]],
                          baseline: str | None, metrics: list[str]) -> None:
    """Add each recipe's difference from ``baseline`` (recipe - baseline, last generation) per metric: ``{m}_diff``
    with its 95% interval, the test (``paired`` over shared seeds when at least 2 are shared, else ``welch``), its
    p-value, the p-value Holm-adjusted over every recipe compared on that metric, and ``{m}_significant``
    (adjusted p < 0.05)."""
    base = per_recipe.get(baseline, {}) if baseline else {}
    others = [e for e in recipes if e["recipe"] != baseline and base]
    for metric in metrics:
        for entry in recipes:
            entry.update({f"{metric}_diff": math.nan, f"{metric}_diff_low": math.nan,
                          f"{metric}_diff_high": math.nan, f"{metric}_test": "", f"{metric}_p": math.nan,
                          f"{metric}_p_holm": math.nan, f"{metric}_significant": ""})
        for entry in others:
            runs = {seed: row.get(metric, math.nan) for seed, row in per_recipe[entry["recipe"]].items()}
            ref = {seed: row.get(metric, math.nan) for seed, row in base.items()}
            shared = sorted(set(runs) & set(ref))
            if len(shared) >= 2:
                c = paired([runs[s] for s in shared], [ref[s] for s in shared])
                test = f"paired t-test, {c.n} seeds"
            else:
                c = welch(list(runs.values()), list(ref.values()))
                test = f"Welch t-test, {len(runs)} vs {len(ref)} seeds"
            entry.update({f"{metric}_diff": c.mean, f"{metric}_diff_low": c.low, f"{metric}_diff_high": c.high,
                          f"{metric}_test": test, f"{metric}_p": c.p})
        adjusted = holm([e[f"{metric}_p"] for e in others])
        for entry, p_holm in zip(others, adjusted):
            entry[f"{metric}_p_holm"] = p_holm
            entry[f"{metric}_significant"] = "yes" if p_holm < SIGNIFICANCE else "no" if math.isfinite(p_holm) else ""


TITLES = {"fid": "FID", "recall": "recall", "minority_share": "minority share", "r_fair": "R_Fair",
          "generation": "gen"}


def title(name: str) -> str:
    return TITLES.get(name, name)


def ranking_markdown(p: Params, ranking: list[dict[str, Any]]) -> str:
    """The ranking with 95% intervals, then each recipe's differences from the baseline, the rules first."""
    metrics = [c.name for c in columns_of(p) if c.rank]
    baseline = next((e["recipe"] for e in ranking if e.get("baseline") == "yes"), None)

    def cell(entry, metric):
        value, low, high = entry[metric], entry.get(f"{metric}_low", math.nan), entry.get(f"{metric}_high", math.nan)
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g} [{low:.4g}, {high:.4g}]" if math.isfinite(low) else f"{value:.4g}"

    head = ["rank", "recipe", "seeds", "generation", *map(title, metrics)]
    lines = ["Rule: each recipe at its last generation, over its seeds (no interval for one seed; NaN values, e.g. an "
             f"undefined minority FID, are left out). {SCALE_NOTE} Ranked by "
             f"{title(scorer_class(p.model.family).rank_by)}, lower first.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {e['rank']} | {e['recipe']} | {e['seeds']} | {e['generation']} | "
              + " | ".join(cell(e, m) for m in metrics) + " |" for e in ranking]
    compared = [e for e in ranking if any(math.isfinite(e.get(f"{m}_p", math.nan)) for m in metrics)]
    if baseline and compared:
        lines += ["", f"### Differences from the baseline, {baseline}", "",
                  f"Rule, stated before the numbers: the baseline is the study's first recipe ({baseline}). For each "
                  "other recipe and metric, the difference recipe − baseline at the last generation, with a 95% "
                  "interval. Where the two recipes ran the same seeds (at least 2 shared), seeds pair: a paired "
                  "t-test over the shared seeds; otherwise Welch's t-test. A difference is significant (**bold**) "
                  f"when its two-sided p-value, Holm-adjusted over the {len(compared)} recipes compared on that "
                  f"metric, is below {SIGNIFICANCE}. With n seeds a paired test has n - 1 degrees of freedom: with few "
                  "seeds only large, consistent differences pass.", "",
                  "| recipe | " + " | ".join(f"Δ {title(m)} [95% CI] (p, Holm p)" for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for e in compared:
            lines.append(f"| {e['recipe']} | " + " | ".join(difference_cell(e, m) for m in metrics) + " |")
        tested = sorted({e[f"{m}_test"] for e in compared for m in metrics if math.isfinite(e[f"{m}_p"])})
        lines += ["", f"Tests run: {'; '.join(tested)}. A difference shown without a p-value was not tested: fewer "
                  "than 2 seeds had both values defined (R_Fair is undefined once a model draws no minority "
                  "samples)."]
    return "\n".join(lines) + "\n"


def difference_cell(entry: dict[str, Any], metric: str) -> str:
    diff = entry[f"{metric}_diff"]
    if not math.isfinite(diff):
        return "n/a"
    low, high, p, p_holm = (entry[f"{metric}_{k}"] for k in ("diff_low", "diff_high", "p", "p_holm"))
    interval_text = f" [{low:+.3g}, {high:+.3g}]" if math.isfinite(low) else ""
    text = f"{diff:+.3g}{interval_text} ({p:.2g}, {p_holm:.2g})" if math.isfinite(p) else f"{diff:+.3g}"
    return f"**{text}**" if entry[f"{metric}_significant"] == "yes" else text


def recipes_figure(p: Params, rows: list[dict[str, Any]], lineages: list[LineageParams], path: Path,
                   metrics: tuple[str, ...] = ("fid", "minority_share")) -> None:
    """Every recipe's mean over its seeds of ``metrics`` vs generation, the picture beside the ranking: one colour
    per recipe apart from its estimator, MLE solid and other estimators dashed; FID on a log scale."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_of = {lineage.name: lineage.group or lineage.name for lineage in lineages}
    estimator_of = {lineage.group or lineage.name: lineage.estimator for lineage in lineages}
    look = {lineage.group or lineage.name: (lineage.mode, lineage.real_fraction, lineage.mitigation,
                                            str(sorted(lineage.set.items()))) for lineage in lineages}
    hues = list(dict.fromkeys(look.values()))
    palette = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # the ten strong hues first, then their light twins
    summary = summarize([{**row, "recipe": group_of.get(row["lineage"], row["lineage"])} for row in rows],
                        ["recipe", "generation"], list(metrics), scales_of(p))
    recipes = list(dict.fromkeys(group_of.get(lineage.name, lineage.name) for lineage in lineages))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics) + 3.2, 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for recipe in recipes:
            points = sorted((s["generation"], s[metric]) for s in summary if s["recipe"] == recipe)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=recipe,
                        color=palette(order[hues.index(look[recipe]) % 20]),
                        linestyle="-" if estimator_of.get(recipe) == "mle" else "--", linewidth=1.2)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if metric == "fid":
            ax.set_yscale("log")
        ax.set_xlabel("generation")
        ax.set_title(f"{title(metric)} ({'geometric mean' if scales_of(p).get(metric) == 'log' else 'mean'} "
                     "over seeds)")
    axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def markdown_table(p: Params, rows: list[dict[str, Any]]) -> str:
    columns = ["lineage", "generation", *summary_columns(p)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, math.nan)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


write_reports_task = as_task(write_reports)


# --- recipes over seeds -----------------------------------------------------------------------------------------


def recipe_metrics(p: Params, rows: list[dict[str, Any]]) -> list[str]:
    """The metrics a recipe summary shows: the scorer's headline and summary columns the rows carry."""
    present = {k for row in rows for k in row}
    return [c.name for c in columns_of(p) if (c.headline or c.summary) and c.name in present]


def recipe_summary(p: Params, rows: list[dict[str, Any]], lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """One row per recipe (a lineage, or the seeds of one: ``seeds: [...]`` in params) and generation: the number of
    seeds, and per metric its centre and 95% interval over them (``<metric>_low``, ``<metric>_high``; by the
    metric's scale, ``tasks.stats.interval``; NaN for a recipe of one seed). Undefined values (NaN) of a seed are
    left out and counted (``<metric>_defined``)."""
    group_of = {lineage.name: lineage.group or lineage.name for lineage in lineages}
    metrics, scales = recipe_metrics(p, rows), scales_of(p)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((group_of.get(row["lineage"], row["lineage"]), row["generation"]), []).append(row)
    out = []
    for (recipe, k), members in groups.items():
        entry: dict[str, Any] = {"recipe": recipe, "generation": k, "seeds": len(members)}
        for metric in metrics:
            values = [float(r.get(metric, math.nan)) for r in members]
            entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"] = interval(values, scales.get(metric,
                                                                                                     "linear"))
            entry[f"{metric}_defined"] = sum(math.isfinite(v) for v in values)
        out.append(entry)
    order = list(dict.fromkeys(group_of.get(row["lineage"], row["lineage"]) for row in rows))
    return sorted(out, key=lambda e: (order.index(e["recipe"]), e["generation"]))


def seeded(recipes: list[dict[str, Any]]) -> bool:
    """Whether any recipe ran over several seeds (then the reports lead with the recipes)."""
    return any(entry["seeds"] > 1 for entry in recipes)


def recipe_csv_rows(p: Params, rows: list[dict[str, Any]], recipes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """recipes.csv (``dvc plots``: the ``recipes`` template draws the mean and its interval as a band)."""
    metrics = recipe_metrics(p, rows)
    columns = ["recipe", "generation", "seeds", *(f"{m}{s}" for m in metrics for s in ("", "_low", "_high"))]
    return [{c: ("" if isinstance(e.get(c), float) and math.isnan(e[c]) else fmt(e.get(c))) for c in columns}
            for e in recipes]


def with_interval(entry: dict[str, Any], metric: str) -> str:
    """``centre [low, high]`` (the interval is asymmetric for positive quantities), and how many seeds were
    undefined when some were."""
    value, low, high = entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"]
    if math.isnan(value):
        return "n/a"
    text = f"{value:.4g} [{low:.3g}, {high:.3g}]" if math.isfinite(low) else f"{value:.4g}"
    missing = entry.get("seeds", 0) - entry.get(f"{metric}_defined", entry.get("seeds", 0))
    return text + (f" ({missing} of {entry['seeds']} seeds n/a)" if missing > 0 else "")


def recipe_markdown(p: Params, rows: list[dict[str, Any]], recipes: list[dict[str, Any]]) -> str:
    metrics = [c for c in summary_columns(p) if c in recipe_metrics(p, rows)]
    head = ["recipe", "generation", "seeds", *map(title, metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {e['recipe']} | {e['generation']} | {e['seeds']} | "
              + " | ".join(with_interval(e, m) for m in metrics) + " |" for e in recipes]
    return "\n".join(lines) + "\n"


def labeller_markdown(labeller: dict[str, float] | None) -> str:
    """The labeller's check, for every report whose numbers depend on its labels ("" when there is none)."""
    if not labeller:
        return ""
    return (f"Labeller (the domain classifier that labels generated images), on {labeller['held_out_images']} held-out "
            f"real images: accuracy {labeller['accuracy']:.3f}; majority precision "
            f"{labeller['precision_majority']:.3f}, recall {labeller['recall_majority']:.3f}; minority precision "
            f"{labeller['precision_minority']:.3f}, recall {labeller['recall_minority']:.3f}. A second labeller "
            f"(another architecture and seed): accuracy {labeller['check_accuracy']:.3f}, agreeing with the first on "
            f"{labeller['agreement_held_out']:.3f} of those images; on each generation's samples its agreement is "
            "the label_agreement column, and its minority share minority_share_check.\n\n")


def summary_markdown(p: Params, rows: list[dict[str, Any]], recipes: list[dict[str, Any]]) -> str:
    """summary.md: with recipes over several seeds, their centre and 95% interval per generation first, then every
    lineage's rows; otherwise the lineages' rows alone."""
    if not seeded(recipes):
        return markdown_table(p, rows)
    return ("## Recipes: centre [95% interval] over seeds, per generation\n\n" + SCALE_NOTE + "\n\n"
            + recipe_markdown(p, rows, recipes)
            + "\nUndefined values of a seed (n/a, e.g. R_Fair when the minority class got too few samples) are left "
              "out of its recipe's centre, and the count of such seeds is shown beside it.\n\n"
              "## Every lineage (one seed each)\n\n" + markdown_table(p, rows))


# --- what is on disk, whatever params made it (madloop show) ------------------------------------------------------


def params_on_disk(p: Params, recipe: dict[str, Any]) -> Params:
    """``p`` with the params keys a lineage's recipe (from its manifest) records: the family, data source, ... the
    outputs were made with, so their table has the right columns."""
    raw = p.model_dump(mode="json")
    for key, value in recipe.items():
        if not key.startswith("lineage.") and key not in ("seed",):
            try:
                set_dotted(raw, key, value)
            except ParamsError:
                continue
    try:
        return validate(raw)
    except ParamsError:
        return p


def study_on_disk(p: Params, paths: StudyPaths) -> tuple[list[dict[str, Any]], list[LineageParams], list[str]]:
    """Every finished generation in the study's lineage folders, whatever params made them: (rows, the lineages as
    their manifests describe them, notes). A note names each lineage that ``p`` does not list or whose outputs
    were made under other params than ``p`` (with the keys that differ), so nothing has to be repeated to see
    them."""
    rows: list[dict[str, Any]] = []
    found: list[LineageParams] = []
    notes: list[str] = []
    known = {lineage.name: lineage for lineage in p.lineages}
    folders = sorted(d for d in paths.data.iterdir() if d.is_dir() and d.name != REAL) if paths.data.is_dir() else []
    for folder in folders:
        finished = []
        for k, path in manifests(folder):
            try:
                finished.append(read_manifest(path))
            except CorruptOutputError as err:  # as collect_rows: the next run reports it and redoes the generation
                warnings.warn(f"{err}; lineage {folder.name}: generation {k} and later are left out (the next run "
                              "redoes them)")
                break
        if not finished:
            continue
        recipe = finished[-1].get("recipe", {})
        spec = known.get(folder.name)
        if spec is None:
            notes.append(f"{folder.name}: not a lineage of these params (made with estimator "
                         f"{recipe.get('lineage.estimator')!r}, seed {recipe.get('lineage.seed')})")
            seed = recipe.get("lineage.seed")
            # a recipe's seeds are named <recipe>-s<seed> (params' ``seeds: [...]``): grouped again here
            group = folder.name.removesuffix(f"-s{seed}") if folder.name.endswith(f"-s{seed}") else None
            spec = LineageParams.model_construct(name=folder.name, estimator=recipe.get("lineage.estimator", "?"),
                                                 seed=seed, group=group)
        else:
            current = lineage_recipe(p, spec)
            differ = [f"{key} = {recipe[key]!r} (these params: {current[key]!r})"
                      for key in sorted(set(recipe) & set(current)) if recipe[key] != current[key]]
            parts = sorted(set(recipe) ^ set(current))  # settings of parts only one of them uses (another family)
            if differ or parts:
                notes.append(f"{folder.name}: made under other params than these: " + "; ".join(differ[:8])
                             + (f"; and {len(differ) - 8} more" if len(differ) > 8 else "")
                             + (f"; settings only one of them has: {', '.join(parts[:6])}"
                                + (" ..." if len(parts) > 6 else "") if parts else ""))
        found.append(spec)
        rows += lineage_rows(spec, finished)
    return rows, found, notes
