"""Where a study's outputs live, what is already done, and how a generation is saved.

Layout under the project root (``data/`` is DVC's, ``reports/`` is git's)::

    data/studies/<study>/real/          train.parquet (dataset 0), test.parquet, manifest.json
    data/studies/<study>/<lineage>/     dataset-001.parquet ...  the datasets generations 1.. train on
                                        model-000.safetensors ... generation k's model weights
                                        samples-000.png ...       a grid of its samples
                                        gen-000.json ...          manifest: params hash, sha256s, metrics
    data/cache/                         the domain classifier, keyed by the hash of its training data
    reports/<study>/                    generations.csv (DVC plots), metrics.json (DVC metrics), summary.md

Generation k is finished when ``gen-k.json`` exists, was made under the same params (recipe hash), and every
file it lists still has the sha256 it recorded. Resuming starts at the first generation that is not.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from tasks import as_task
from tasks.datasets import Dataset, RealData, check_source, load_real, read_parquet, write_parquet
from tasks.paper import summarize
from tasks.params import (LineageParams, Params, ParamsError, digest, flatten, lineage_recipe,
                          real_data_recipe, score_recipe)
from tasks.training import build_family
from tasks.storage import (CorruptOutputError, file_digest, read_json, verify, write_atomic,
                           write_csv_atomic, write_json_atomic)

METRIC_COLUMNS = ["fid", "kid", "precision", "recall", "minority_share", "fid_majority", "fid_minority", "r_fair"]
RESERVED_NAMES = {"real"}


class StaleOutputsError(ParamsError):
    """Outputs on disk were made under other params; they are neither reused nor replaced without --overwrite."""


@dataclass(frozen=True)
class StudyPaths:
    root: Path
    study: str

    @property
    def data(self) -> Path:
        return self.root / "data" / "studies" / self.study

    @property
    def real(self) -> Path:
        return self.data / "real"

    def lineage(self, name: str) -> Path:
        return self.data / name

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.study

    @property
    def cache(self) -> Path:
        return self.root / "data" / "cache"

    @property
    def trash(self) -> Path:
        return self.root / ".madloop" / "trash"


def dataset_name(k: int) -> str:
    return f"dataset-{k:03d}.parquet"


def generation_files(k: int) -> dict[str, str]:
    return {"dataset": dataset_name(k + 1), "model": f"model-{k:03d}.safetensors",
            "samples": f"samples-{k:03d}.png", "manifest": f"gen-{k:03d}.json"}


# --- what is done ---------------------------------------------------------------------------------------------


@dataclass
class LineageState:
    finished: list[dict[str, Any]] = field(default_factory=list)  # verified manifests of generations 0..j-1
    stale: list[str] = field(default_factory=list)  # "key: old -> new" for outputs made under other params
    corrupt: str | None = None  # why the first unfinished generation's old outputs cannot be used

    @property
    def next_generation(self) -> int:
        return len(self.finished)


def param_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def inspect_lineage(folder: Path, recipe: dict[str, Any], real_train_sha: str | None) -> LineageState:
    """Walk the manifests of a lineage folder: which generations are finished and trustworthy."""
    state, recipe_hash = LineageState(), digest(recipe)
    previous_sha = real_train_sha
    k = 0
    while (manifest_path := folder / generation_files(k)["manifest"]).is_file():
        try:
            manifest = read_json(manifest_path)
        except (OSError, ValueError) as err:
            state.corrupt = f"{manifest_path} is unreadable ({err})"
            break
        if manifest.get("recipe_hash") != recipe_hash:
            state.stale = param_diff(manifest.get("recipe", {}), recipe) or ["(params hash differs)"]
            break
        try:
            if previous_sha is not None and manifest["trained_on"]["sha256"] != previous_sha:
                raise CorruptOutputError(f"{manifest_path} trained on a dataset that is no longer on disk "
                                         "(its sha256 differs)")
            verify(manifest_path, manifest["outputs"])
        except CorruptOutputError as err:
            state.corrupt = str(err)
            break
        state.finished.append(manifest)
        previous_sha = manifest["outputs"][generation_files(k)["dataset"]]
        k += 1
    return state


def move_to_trash(paths: StudyPaths, targets: list[Path]) -> Path | None:
    """Keep what is replaced: move it under .madloop/trash/<timestamp>/ (same relative layout)."""
    targets = [t for t in targets if t.exists()]
    if not targets:
        return None
    bin_ = paths.trash / time.strftime("%Y%m%d-%H%M%S")
    for target in targets:
        dest = bin_ / target.relative_to(paths.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(target), str(dest))
    return bin_


def quarantine_from(paths: StudyPaths, folder: Path, k: int) -> Path | None:
    """Move generation k's outputs and everything after it out of the way (they cannot be trusted)."""
    doomed = []
    j = k
    while any((folder / f).exists() for f in generation_files(j).values()):
        doomed += [folder / f for f in generation_files(j).values()]
        j += 1
    return move_to_trash(paths, doomed)


# --- preflight: everything that can be wrong is found before any work -----------------------------------------


@dataclass(frozen=True)
class Plan:
    params: Params
    paths: StudyPaths
    lineages: list[LineageParams]


def real_manifest_path(paths: StudyPaths) -> Path:
    return paths.real / "manifest.json"


def preflight(p: Params, root: Path, lineages: list[str] | None = None, overwrite: bool = False) -> Plan:
    """Check params against the world (dataset root, DVC repo, outputs made under other params) and, with
    ``overwrite``, move stale outputs to the trash. Raises ParamsError naming the problem; does no work."""
    root = root.resolve()
    paths = StudyPaths(root, p.study.name)
    chosen = [p.lineage(name) for name in lineages] if lineages else list(p.lineages)
    for lineage in chosen:
        if lineage.name in RESERVED_NAMES:
            raise ParamsError(f"lineages: {lineage.name!r} is reserved (the real data folder)")
    check_source(p.data, root)
    if p.dvc.track:
        from tasks.versioning import NotADvcRepoError, find_dvc_root

        try:
            find_dvc_root(root)
        except NotADvcRepoError as err:
            raise ParamsError(f"dvc.track: {err}") from None

    stale: dict[Path, list[str]] = {}
    real_manifest = real_manifest_path(paths)
    if real_manifest.is_file():
        old = read_json(real_manifest)
        if old.get("recipe_hash") != digest(real_data_recipe(p)):
            stale[paths.real] = param_diff(old.get("recipe", {}), real_data_recipe(p))
    for lineage in chosen:
        folder = paths.lineage(lineage.name)
        state = inspect_lineage(folder, lineage_recipe(p, lineage), None)
        if state.stale:
            stale[folder] = state.stale
    if stale and not overwrite:
        lines = [f"  {folder.relative_to(root)}: " + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
                 for folder, diff in stale.items()]
        raise StaleOutputsError(
            "outputs on disk were made under other params and would not be reused:\n" + "\n".join(lines) +
            f"\nRe-run with --overwrite to move them to {paths.trash.relative_to(root)}/ and start over, "
            "or set study.name to keep both.")
    if stale:
        bin_ = move_to_trash(paths, list(stale))
        retired = retire_mlflow_lineages(p, paths, [f.name for f in stale if f != paths.real])
        warnings.warn(f"--overwrite: moved outputs made under other params to {bin_}"
                      + (f" and soft-deleted their {retired} MLflow runs (mlflow runs restore brings them back)"
                         if retired else ""))
    return Plan(p, paths, chosen)


def retire_mlflow_lineages(p: Params, paths: StudyPaths, names: list[str]) -> int:
    if not names:
        return 0
    from tasks.tracking import client_for, retire_lineage_runs, tracking_uri

    client = client_for(tracking_uri(p.tracking.uri, paths.root))
    exp = client.get_experiment_by_name(p.experiment)
    if exp is None:
        return 0
    return sum(retire_lineage_runs(client, exp.experiment_id, p.study.name, name) for name in names)


# --- real data ------------------------------------------------------------------------------------------------


def prepare_real_data(p: Params, paths: StudyPaths) -> RealData:
    """Load the source and write dataset 0 and the test split (reused when already written under these params)."""
    truth = build_family(p, (1,)) if p.data.source == "model" else None
    real = load_real(p.data, p.seed, paths.root, truth)
    recipe = real_data_recipe(p)
    manifest_path = real_manifest_path(paths)
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get("recipe_hash") == digest(recipe):
            try:
                verify(manifest_path, manifest["outputs"])
                return real
            except CorruptOutputError as err:
                warnings.warn(f"{err}; writing the real data again")
    outputs = {name: write_atomic(paths.real / name, lambda tmp, d=data: write_parquet(d, tmp))
               for name, data in (("train.parquet", real.train), ("test.parquet", real.test))}
    write_json_atomic(manifest_path, {"recipe_hash": digest(recipe), "recipe": recipe, "outputs": outputs,
                                      "rows": {"train": len(real.train), "test": len(real.test)}})
    return real


def real_train_sha(paths: StudyPaths) -> str:
    return read_json(real_manifest_path(paths))["outputs"]["train.parquet"]


# --- one generation -------------------------------------------------------------------------------------------


def save_generation(folder: Path, k: int, tensors: dict[str, torch.Tensor], next_dataset: Dataset,
                    picture: Callable[[Path], None], metrics: dict[str, float], recipe: dict[str, Any],
                    score_hash: str, trained_on: dict[str, str], info: dict[str, Any]) -> dict[str, Any]:
    """Write generation k atomically, manifest last: a killed run leaves it either finished or not begun.
    ``picture(path)`` draws the generation's PNG (a sample grid, or a histogram against the truth)."""
    files = generation_files(k)
    outputs = {
        files["dataset"]: write_atomic(folder / files["dataset"], lambda tmp: write_parquet(next_dataset, tmp)),
        files["model"]: write_atomic(folder / files["model"], lambda tmp: save_file(tensors, str(tmp))),
        files["samples"]: write_atomic(folder / files["samples"], picture),
    }
    manifest = {
        "generation": k, "recipe_hash": digest(recipe), "recipe": recipe, "score_hash": score_hash,
        "trained_on": trained_on, "outputs": outputs, "metrics": metrics, "info": info,
        # DVC's content address of each file (md5), the link MLflow runs carry back to DVC
        "md5": {name: file_digest(folder / name, "md5") for name in outputs},
        "rows": {"trained_on": info.get("rows_trained_on"), "produced": len(next_dataset)},
    }
    write_json_atomic(folder / files["manifest"], manifest)
    return manifest


def rescore_manifest(folder: Path, manifest: dict[str, Any], metrics: dict[str, float], score_hash: str) -> dict:
    manifest = {**manifest, "metrics": metrics, "score_hash": score_hash}
    write_json_atomic(folder / generation_files(manifest["generation"])["manifest"], manifest)
    return manifest


def load_generation_model(folder: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(folder / generation_files(k)["model"]))


def load_generation_dataset(folder: Path, k: int) -> Dataset:
    return read_parquet(folder / dataset_name(k))


# --- reports --------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


IMAGE_SUMMARY = ["fid", "precision", "recall", "minority_share", "r_fair"]


def collect_rows(p: Params, paths: StudyPaths, lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """Every finished generation of every lineage, from the manifests on disk (the source of truth)."""
    rows = []
    for lineage in lineages:
        state = inspect_lineage(paths.lineage(lineage.name), lineage_recipe(p, lineage), None)
        for manifest in state.finished[:p.loop.generations]:
            rows.append({"lineage": lineage.name, "estimator": lineage.estimator, "generation": manifest["generation"],
                         **manifest["metrics"], "fit_seconds": manifest["info"].get("fit_seconds", math.nan)})
    return rows


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Image metrics first in the documented order, then whatever else the rows carry, in first-seen order."""
    seen = [k for row in rows for k in row if k not in ("lineage", "estimator", "generation")]
    ordered = [c for c in METRIC_COLUMNS if c in seen]
    return ordered + [c for c in dict.fromkeys(seen) if c not in ordered]


def summary_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns = metric_columns(rows)
    if "fid" in columns:
        return IMAGE_SUMMARY
    return [c for c in columns if c.startswith("param.")] + [c for c in ("kl", "wasserstein") if c in columns]


def write_reports(p: Params, paths: StudyPaths, lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """generations.csv (dvc plots), metrics.json (dvc metrics: each lineage's last generation), summary.md."""
    rows = collect_rows(p, paths, lineages)
    paths.reports.mkdir(parents=True, exist_ok=True)
    columns = ["lineage", "estimator", "generation", *metric_columns(rows)]

    write_csv_atomic(paths.reports / "generations.csv",
                     [{c: fmt(row.get(c, math.nan)) for c in columns} for row in rows], columns)
    final = {}
    for row in rows:
        final[row["lineage"]] = {c: (None if isinstance(row.get(c), float) and not math.isfinite(row[c])
                                     else row.get(c)) for c in ["generation", *metric_columns([row])]}
    write_json_atomic(paths.reports / "metrics.json", final)
    write_atomic(paths.reports / "summary.md", lambda tmp: tmp.write_text(markdown_table(rows)))
    ranking = rank_recipes(rows, lineages)
    if ranking:
        write_csv_atomic(paths.reports / "lineages.csv", [{c: fmt(v) for c, v in r.items()} for r in ranking])
        write_atomic(paths.reports / "lineages.md", lambda tmp: tmp.write_text(ranking_markdown(ranking)))
    return rows


RANK_METRICS = ["fid", "recall", "minority_share", "r_fair"]


def rank_recipes(rows: list[dict[str, Any]], lineages: list[LineageParams]) -> list[dict[str, Any]]:
    """Each recipe (a lineage, or the seeds of one) at its last generation: mean and spread over its seeds of
    FID, recall, minority share and R_Fair, ranked by FID (lower first)."""
    if not rows or "fid" not in rows[0]:
        return []
    group_of = {lineage.name: lineage.group or lineage.name for lineage in lineages}
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["generation"] >= last.get(row["lineage"], {"generation": -1})["generation"]:
            last[row["lineage"]] = row
    recipes = summarize([{**row, "recipe": group_of.get(name, name)} for name, row in last.items()],
                        ["recipe", "generation"], RANK_METRICS)
    recipes.sort(key=lambda e: (math.isnan(e["fid"]), e["fid"]))
    return [{"rank": rank, "recipe": e.pop("recipe"), "seeds": e.pop("runs"), **e}
            for rank, e in enumerate(recipes, 1)]


def ranking_markdown(ranking: list[dict[str, Any]]) -> str:
    def cell(entry, metric):
        value, sd = entry[metric], entry[f"{metric}_sd"]
        return "n/a" if math.isnan(value) else (f"{value:.4g} ± {sd:.2g}" if math.isfinite(sd) else f"{value:.4g}")

    lines = ["| rank | recipe | seeds | generation | FID | recall | minority share | R_Fair |", "|" + "---|" * 8]
    lines += [f"| {e['rank']} | {e['recipe']} | {e['seeds']} | {e['generation']} | {cell(e, 'fid')} | "
              f"{cell(e, 'recall')} | {cell(e, 'minority_share')} | {cell(e, 'r_fair')} |" for e in ranking]
    return "\n".join(lines) + "\n\nLast generation of each recipe; mean ± standard deviation over its seeds.\n"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = ["lineage", "generation", *summary_columns(rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, math.nan)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


prepare_real_data_task = as_task(prepare_real_data)
save_generation_task = as_task(save_generation)
write_reports_task = as_task(write_reports)
