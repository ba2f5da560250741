"""What is already done, whether it can be trusted, and what to do about what cannot.

Generation k of a lineage is finished when ``gen-k.json`` exists, was made under the same params (recipe hash),
trained on the dataset the previous generation produced, and every file it lists still has the sha256 it
recorded. Resuming starts at the first generation that is not.

Each run checks each lineage once: :func:`preflight`, before any work, reads the manifests' params hashes (outputs
made under other params stop the run, or with ``--overwrite`` go to the trash); the study flow then verifies
every file once (:func:`inspect_lineage`) and hands the verified state to its in-process lineages.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.layout import REAL, REAL_TRAIN, StudyPaths, generation_files
from tasks.params import LineageParams, Params, ParamsError, digest, flatten, lineage_recipe, real_data_recipe
from tasks.registries import SOURCES
from tasks.storage import CorruptOutputError, read_json, verify


class StaleOutputsError(ParamsError):
    """Outputs on disk were made under other params; they are neither reused nor replaced without --overwrite."""


@dataclass
class LineageState:
    finished: list[dict[str, Any]] = field(default_factory=list)  # verified manifests of generations 0..j-1
    stale: list[str] = field(default_factory=list)  # "key: old -> new" for outputs made under other params
    corrupt: str | None = None  # why the first unfinished generation's old outputs cannot be used

    @property
    def next_generation(self) -> int:
        return len(self.finished)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def manifests(folder: Path):
    """(k, path) of gen-000.json, gen-001.json, ... as long as they exist."""
    k = 0
    while (path := folder / generation_files(k)["manifest"]).is_file():
        yield k, path
        k += 1


def recipe_diff(folder: Path, recipe: dict[str, Any]) -> list[str]:
    """How the params of the outputs in ``folder`` differ from ``recipe`` (reads the manifests only)."""
    recipe_hash = digest(recipe)
    for _, path in manifests(folder):
        try:
            manifest = read_json(path)
        except (OSError, ValueError):
            return []  # unreadable: corrupt, not stale (inspect_lineage reports it)
        if manifest.get("recipe_hash") != recipe_hash:
            return param_diff(manifest.get("recipe", {}), recipe) or ["(params hash differs)"]
    return []


def inspect_lineage(folder: Path, recipe: dict[str, Any], real_train_sha: str | None) -> LineageState:
    """Walk the manifests of a lineage folder, verifying every file: which generations are finished and
    trustworthy."""
    state, recipe_hash = LineageState(), digest(recipe)
    previous_sha = real_train_sha
    for k, manifest_path in manifests(folder):
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


def real_train_sha(paths: StudyPaths) -> str:
    return read_json(paths.real_manifest)["outputs"][REAL_TRAIN]


# --- preflight: everything that can be wrong is found before any work -----------------------------------------


@dataclass(frozen=True)
class Plan:
    params: Params
    paths: StudyPaths
    lineages: list[LineageParams]


def preflight(p: Params, root: Path, lineages: list[str] | None = None, overwrite: bool = False) -> Plan:
    """Check params against the world (the data source, the DVC repo, outputs made under other params) and, with
    ``overwrite``, move stale outputs to the trash. Raises ParamsError naming the problem; does no work."""
    root = root.resolve()
    paths = StudyPaths(root, p.study.name)
    chosen = [p.lineage(name) for name in lineages] if lineages else list(p.lineages)
    for lineage in chosen:
        if lineage.name == REAL:
            raise ParamsError(f"lineages: {lineage.name!r} is reserved (the real data folder)")
    SOURCES.get(p.data.source).check(p.data, root)
    if p.dvc.track:
        from tasks.versioning import NotADvcRepoError, find_dvc_root

        try:
            find_dvc_root(root)
        except NotADvcRepoError as err:
            raise ParamsError(f"dvc.track: {err}") from None

    stale: dict[Path, list[str]] = {}
    if paths.real_manifest.is_file():
        old = read_json(paths.real_manifest)
        if old.get("recipe_hash") != digest(real_data_recipe(p)):
            stale[paths.real] = param_diff(old.get("recipe", {}), real_data_recipe(p))
    for lineage in chosen:
        folder = paths.lineage(lineage.name)
        diff = recipe_diff(folder, lineage_recipe(p, lineage))
        if diff:
            stale[folder] = diff
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
