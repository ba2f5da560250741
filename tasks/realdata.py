"""Dataset 0 of every lineage: the study's real split and each lineage's own draw from it, written once per
params and reused after that.

``data/studies/<study>/real/`` holds the held-out split (``test.parquet``) and one ``train-s<seed>-<key>.parquet``
per distinct draw (``tasks.layout.real_train_name``): under ``data.draw: per_seed`` each lineage seed draws its own
dataset 0, so lineages of one seed (MLE, PLE, the control) share a file and pair on the same real data. The
manifest records each file's sha256 (the file), content sha256 (the data) and the recipe of the draw it holds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from models.families import build_family
from tasks.datasets import Dataset, RealData, RealSplit, data_digest, draw_real, load_split, write_parquet
from tasks.layout import REAL_TEST, StudyPaths, real_train_name
from tasks.params import LineageParams, Params, digest, lineage_params, lineage_seed, real_data_recipe
from tasks.storage import CorruptOutputError, file_digest, read_manifest, verify, write_atomic, write_manifest


def draw_seed(p: Params, spec: LineageParams) -> int:
    """The seed that decides a lineage's real draw: its own under ``data.draw: per_seed``, the study's under
    ``shared`` (``p``: the lineage's params)."""
    return lineage_seed(p, spec) if p.data.draw == "per_seed" else p.seed


def draw_recipe(p: Params, spec: LineageParams) -> dict[str, Any]:
    """What decides a lineage's dataset 0: the split's recipe under the lineage's params, and its draw seed."""
    return {**real_data_recipe(p), "data.draw_seed": draw_seed(p, spec)}


def real_train_file(p: Params, spec: LineageParams) -> str:
    """The file under ``real/`` that holds the dataset 0 of lineage ``spec`` (named by its draw seed and recipe)."""
    recipe = draw_recipe(lineage_params(p, spec), spec)
    return real_train_name(recipe["data.draw_seed"], digest(recipe)[:8])


@dataclass
class StudyReal:
    """A study's real data as its lineages see it: the shared split, and per lineage its own :class:`RealData`
    and the file under ``real/`` that holds its dataset 0."""

    split: RealSplit
    lineages: dict[str, RealData]
    files: dict[str, str]

    def of(self, name: str) -> RealData:
        try:
            return self.lineages[name]
        except KeyError:
            raise KeyError(f"the real data of lineage {name!r} was not prepared (prepared: "
                           f"{', '.join(self.lineages)})") from None


def prepare_real_data(p: Params, paths: StudyPaths, lineages: list[LineageParams] | None = None) -> StudyReal:
    """Load the source's split once, draw each lineage's dataset 0 (``lineages``, default every lineage of
    ``p``), and write what is not on disk yet under these params. A file already written is reused only when its
    content is the data drawn now (the manifest records the content of each file as well as its bytes)."""
    split = load_split(p.data, p.seed, paths.root, build_family(p.model.family, (1,), p.model))
    views, files, datasets = {}, {}, {REAL_TEST: split.test}
    recipes: dict[str, dict[str, Any]] = {}
    for spec in lineages if lineages is not None else p.lineages:
        lp = lineage_params(p, spec)
        recipe, name = draw_recipe(lp, spec), real_train_file(p, spec)
        views[spec.name] = draw_real(split, lp.data, recipe["data.draw_seed"],
                                     build_family(lp.model.family, (1,), lp.model))
        files[spec.name], datasets[name], recipes[name] = name, views[spec.name].train, recipe
    write_real(p, paths, datasets, recipes)
    return StudyReal(split, views, files)


def write_real(p: Params, paths: StudyPaths, datasets: dict[str, Dataset], recipes: dict[str, dict]) -> None:
    """Write the files of ``datasets`` that the manifest does not already vouch for, then the manifest (only when
    something changed, so lineages running at once in other processes never race to rewrite it)."""
    recipe = real_data_recipe(p)
    old = existing_manifest(paths, digest(recipe))
    outputs, data, md5, draws = (dict(old.get(key, {})) for key in ("outputs", "data", "md5", "draws"))
    changed = not old
    for name, dataset in datasets.items():
        content = data_digest(dataset)
        if data.get(name) == content and name in outputs:
            continue
        if name in data:
            warnings.warn(f"{paths.real / name}: the source's data changed under the same params; writing it again "
                          "(lineages trained on the old data are redone)")
        outputs[name] = write_atomic(paths.real / name, lambda tmp, d=dataset: write_parquet(d, tmp))
        data[name], md5[name], changed = content, file_digest(paths.real / name, "md5"), True
        if name in recipes:
            draws[name] = recipes[name]
    if changed:
        write_manifest(paths.real_manifest, {"recipe_hash": digest(recipe), "recipe": recipe, "outputs": outputs,
                                             "data": data, "md5": md5, "draws": draws,
                                             "rows": {**old.get("rows", {}),
                                                      **{name: len(d) for name, d in datasets.items()}}})


def existing_manifest(paths: StudyPaths, recipe_hash: str) -> dict[str, Any]:
    """The real data's manifest when it was written under this split's params and every file it lists is intact
    (else {}: everything is written again)."""
    if not paths.real_manifest.is_file():
        return {}
    try:
        manifest = read_manifest(paths.real_manifest)
        if manifest.get("recipe_hash") != recipe_hash:
            return {}
        verify(paths.real_manifest, manifest["outputs"])
        return manifest
    except (CorruptOutputError, KeyError) as err:
        warnings.warn(f"{err}; writing the real data again")
        return {}


def data_problem(p: Params, paths: StudyPaths, lineages: list[LineageParams]) -> str | None:
    """Why a lineage cannot run on the real data it would draw (its loop mode's ``data_problem``: a fresh-data pool
    too small for its generations), or None. Draws in memory and writes nothing: checked before any work."""
    from tasks.modes import LoopMode
    from tasks.registries import MODES

    asking = [(spec, lineage_params(p, spec)) for spec in lineages]
    asking = [(spec, lp) for spec, lp in asking if MODES.get(lp.loop.mode).data_problem is not LoopMode.data_problem]
    if not asking:
        return None
    split = load_split(p.data, p.seed, paths.root, build_family(p.model.family, (1,), p.model))
    for spec, lp in asking:
        real = draw_real(split, lp.data, draw_seed(lp, spec), build_family(lp.model.family, (1,), lp.model))
        problem = MODES.get(lp.loop.mode).data_problem(lp, real)
        if problem:
            return f"lineages: lineage {spec.name!r} (loop mode {lp.loop.mode}): {problem}"
    return None


