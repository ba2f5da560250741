"""What is already done, whether it can be trusted, and what to do about what cannot.

Generation k of a lineage is finished when ``gen-k.json`` exists and matches its own checksum, was made under the
same params (recipe hash), trained on the data the previous generation produced (the sha256 of the dataset's
content as the fit got it, against the one its producer recorded), and every file it lists still has the sha256 it
recorded. Resuming starts at the first generation that is not; its files and everything after them (files
without a manifest included) go to the trash before the generation is redone.

Each run checks each lineage once: :func:`preflight`, before any work, reads the manifests' params hashes (outputs
made under other params stop the run, or with ``--overwrite`` go to the trash); ``tasks.study.Study.open`` then
verifies every file once (:func:`inspect_lineage`) and its lineages start from the verified state.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tasks.layout import (REAL, REPORT_FILES, StudyPaths, file_name_problem, generation_files, generation_of,
                          reports_folder)
from tasks.params import (LineageParams, Params, ParamsError, digest, flatten, lineage_recipe, real_data_recipe,
                          tracking_uri_problem)
from tasks.registries import SOURCES
from tasks import storage
from tasks.storage import CorruptOutputError, read_manifest, verify


class StaleOutputsError(ParamsError):
    """Outputs on disk were made under other params; they are neither reused nor replaced without --overwrite."""


class EditedOutputsError(ParamsError):
    """Outputs on disk differ from what git's last commit of their folder recorded (tasks.integrity)."""


def edited_since_commit(root: Path, folders: list[Path]) -> dict[Path, list[str]]:
    """folder -> each difference from its last commit that no run makes (``tasks.integrity``), for those with any."""
    from tasks.integrity import check_against_commit

    found = {folder: check_against_commit(root, folder).problems for folder in folders if folder.is_dir()}
    return {folder: problems for folder, problems in found.items() if problems}


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
            manifest = read_manifest(path)
        except CorruptOutputError:
            return []  # corrupt, not stale (inspect_lineage reports it)
        if manifest.get("recipe_hash") != recipe_hash:
            return param_diff(manifest.get("recipe", {}), recipe) or ["(params hash differs)"]
    return []


def inspect_lineage(folder: Path, recipe: dict[str, Any], real_train_data: str | None) -> LineageState:
    """Walk the manifests of a lineage folder, verifying every file: which generations are finished and
    trustworthy. ``real_train_data``: the content sha256 of dataset 0 (None: not checked)."""
    state, recipe_hash = LineageState(), digest(recipe)
    previous = real_train_data
    for k, manifest_path in manifests(folder):
        try:
            manifest = read_manifest(manifest_path)
        except CorruptOutputError as err:
            state.corrupt = str(err)
            break
        if manifest.get("recipe_hash") != recipe_hash:
            state.stale = param_diff(manifest.get("recipe", {}), recipe) or ["(params hash differs)"]
            break
        try:
            if previous is not None and manifest["trained_on"].get("data_sha256") != previous:
                raise CorruptOutputError(f"{manifest_path}: generation {k} trained on other data than dataset {k} "
                                         "as it was made (its content sha256 differs)")
            verify(manifest_path, manifest["outputs"])
        except CorruptOutputError as err:
            state.corrupt = str(err)
            break
        state.finished.append(manifest)
        previous = manifest["data"][generation_files(k)["dataset"]]
    if not state.corrupt and not state.stale:
        state.corrupt = unvouched_files(folder, state.next_generation)
    return state


def unvouched_files(folder: Path, k: int) -> str | None:
    """Why files of generation k or later are on disk although generation k has no manifest, or None."""
    later = sorted({j for path in folder.glob("*") if (j := generation_of(path.name)) is not None and j >= k})
    if not later:
        return None
    manifest = folder / generation_files(k)["manifest"]
    if later != [k]:
        return f"{manifest} is missing, but files of generations {later[0]}-{later[-1]} are on disk"
    return f"generation {k} in {folder} was not finished (files without a manifest: a killed run)"


def move_to_trash(paths: StudyPaths, targets: list[Path]) -> Path | None:
    """Keep what is replaced: move it under .madloop/trash/<timestamp>/ (same relative layout)."""
    return storage.move_to_trash(paths.root, paths.trash, targets)


def quarantine_from(paths: StudyPaths, folder: Path, k: int) -> Path | None:
    """Move generation k's outputs and everything after it out of the way (they cannot be trusted)."""
    doomed = sorted(path for path in folder.glob("*") if (j := generation_of(path.name)) is not None and j >= k)
    return move_to_trash(paths, doomed)


def real_train_data(paths: StudyPaths, file: str) -> str:
    """The content sha256 of a lineage's dataset 0 (``file`` under real/), as the real data's (verified) manifest
    records it."""
    return read_manifest(paths.real_manifest)["data"][file]


# --- preflight: everything that can be wrong is found before any work -----------------------------------------


@dataclass(frozen=True)
class Plan:
    params: Params
    paths: StudyPaths
    lineages: list[LineageParams]


def check_world(p: Params, root: Path, lineages: list[str] | None = None) -> list[LineageParams]:
    """What params ask of this machine and project, checked without writing anything: the lineages, the device,
    the tracking URI from the environment, the data source, the DVC repo. Returns the chosen lineages."""
    chosen = [p.lineage(name) for name in lineages] if lineages else list(p.lineages)
    for lineage in chosen:
        if lineage.name == REAL:
            raise ParamsError(f"lineages: {lineage.name!r} is reserved (the real data folder)")
    too_long = file_name_problem(root, p.study.name, [lineage.name for lineage in chosen])
    if too_long:
        raise ParamsError(f"invalid params: {too_long[0]}: {too_long[1]}")
    from tasks.generation import resolve_device  # torch: only when checking against the world

    resolve_device(p.device)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri and tracking_uri_problem(env_uri):
        raise ParamsError(f"MLFLOW_TRACKING_URI (it wins over tracking.uri): {tracking_uri_problem(env_uri)}")
    SOURCES.get(p.data.source).check(p.data, root)
    if p.dvc.track:
        from tasks.versioning import NotADvcRepoError, find_dvc_root

        try:
            find_dvc_root(root)
        except NotADvcRepoError as err:
            raise ParamsError(f"dvc.track: {err}") from None
    return chosen


def preflight(p: Params, root: Path, lineages: list[str] | None = None, overwrite: bool = False) -> Plan:
    """Check params against the world (:func:`check_world`, and outputs made under other params) and, with
    ``overwrite``, move stale outputs to the trash. Raises ParamsError naming the problem; does no other work."""
    root = root.resolve()
    paths = StudyPaths(root, p.study.name)
    chosen = check_world(p, root, lineages)
    from tasks.realdata import data_problem  # loads the source: only once the rest of the world checked out

    problem = data_problem(p, paths, chosen)
    if problem:
        raise ParamsError(f"invalid params: {problem}")

    stale: dict[Path, list[str]] = {}
    if paths.real_manifest.is_file():
        try:
            old = read_manifest(paths.real_manifest)
        except CorruptOutputError:
            old = None  # written again by the run (tasks.realdata), not stale
        if old is not None and old.get("recipe_hash") != digest(real_data_recipe(p)):
            stale[paths.real] = param_diff(old.get("recipe", {}), real_data_recipe(p))
    for lineage in chosen:
        folder = paths.lineage(lineage.name)
        diff = recipe_diff(folder, lineage_recipe(p, lineage))
        if diff:
            stale[folder] = diff
    edited = edited_since_commit(root, [paths.real, *(paths.lineage(lineage.name) for lineage in chosen)])
    if edited and not overwrite:
        problems = [problem for found in edited.values() for problem in found]
        more = f" (and {len(problems) - 1} more: `madloop verify {p.study.name}`)" if len(problems) > 1 else ""
        raise EditedOutputsError(
            f"{problems[0]}{more}. Not used: re-run with --overwrite to move the folder to "
            f"{paths.trash.relative_to(root)}/ and start over, restore what was committed (`git checkout "
            "<folder>.dvc`, then `dvc checkout --force <folder>.dvc`), or commit the .dvc file to accept the "
            "folder as it is")
    for folder, problems in edited.items():  # --overwrite: to the trash with the stale folders
        stale.setdefault(folder, []).extend(problems)
    if stale and not overwrite:
        lines = [f"  {folder.relative_to(root)}: " + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
                 for folder, diff in stale.items()]
        raise StaleOutputsError(
            "outputs on disk were made under other params and would not be reused:\n" + "\n".join(lines) +
            f"\nRe-run with --overwrite to move them to {paths.trash.relative_to(root)}/ and start over, "
            "or set study.name to keep both.")
    if stale:  # their MLflow runs stay: the new outputs get new runs (tasks.tracking.lineage_run)
        bin_ = move_to_trash(paths, list(stale))
        warnings.warn(f"--overwrite: moved outputs made under other params{' or edited since their commit' if edited else ''}"
                      f" to {bin_} (their MLflow runs stay)")
    return Plan(p, paths, chosen)


def check_names(p: Params, root: Path, papers: Sequence[str] = ()) -> None:
    """A study a person runs (``madloop run``, a schedule) may not take a name that belongs to something else in the
    project: one of the paper studies ``papers`` (its reports/<name>/ and MLflow experiment; its sub-studies are
    <name>-...; ``flows.studies.STUDIES.names()``, which the command line passes), or a file under reports/
    (RESULTS.md)."""
    for key, name in (("study.name", p.study.name), ("tracking.experiment", p.tracking.experiment)):
        paper = next((s for s in papers if name is not None and (name == s or name.startswith(f"{s}-"))), None)
        if paper:
            raise ParamsError(f"invalid params: {key}: {name!r} belongs to the paper study {paper} (reports/{name}/ "
                              f"and its MLflow experiment): choose another name")
    report = reports_folder(root.resolve(), p.study.name)
    if p.study.name.lower() in {f.lower() for f in REPORT_FILES} or (report.exists() and not report.is_dir()):
        raise ParamsError(f"invalid params: study.name: reports/{p.study.name} is a file, not a study's folder: "
                          "choose another name")
