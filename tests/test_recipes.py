"""Every lineage means what its recipe says (issue 22): a seed draws its own real data, a lineage's `set:` is
honoured or refused before any work, and dataset 0 as written holds what the recipe records. Plain functions and
files read back: no training."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tasks.datasets import read_parquet
from tasks.layout import StudyPaths
from tasks.params import ParamsError, flatten, lineage_params, lineage_recipe, study_wide_problem, validate
from tasks.realdata import data_problem, prepare_real_data
from tasks.storage import read_manifest
from tests.conftest import tiny
from tests.test_resume_hash import changed_value

GAUSSIAN = dict(model__family="gaussian", data__source="model", data__size=20)


def value_at(p, key: str):
    """A key's value in params, through sections and plain dict fields (studies.fig4.sizes.uniform)."""
    node = p
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def probe(raw: dict, key: str, value) -> dict:
    return {**raw, "lineages": [{"name": "base", "estimator": "mle"},
                                {"name": "x", "estimator": "mle", "set": {key: value}}]}


@pytest.mark.parametrize("kind", ["image", "scalar"])
def test_every_key_a_lineage_may_set_is_honoured_and_every_other_is_refused(kind):
    raw = tiny(study__name="sets") if kind == "image" else tiny(study__name="sets", **GAUSSIAN)
    p = validate(raw)
    keys = [k for k in flatten(p.model_dump(mode="json")) if not k.startswith("lineages")]
    keys = list(dict.fromkeys(re.sub(r"^(studies\.[^.]+\.params)\..*$", r"\1", k) for k in keys))
    honoured, refused = [], []
    for key in keys:
        new = changed_value(raw, key, value_at(p, key))
        if new is None:
            continue  # no other valid value for the whole study either (test_resume_hash lists why)
        problem = study_wide_problem(key)
        if problem:
            with pytest.raises(ParamsError, match=f"set: {re.escape(key)}: cannot vary per lineage"):
                validate(probe(raw, key, new))
            refused.append(key)
            continue
        try:
            study = validate(probe(raw, key, new))
        except ParamsError as err:  # a value valid for the study may not suit this lineage's estimator
            assert key in str(err), (key, str(err))
            continue
        lineage = study.lineage("x")
        assert value_at(lineage_params(study, lineage), key) == new, f"{key}: set but not honoured"
        recipe = lineage_recipe(study, lineage)
        if key in recipe:
            assert recipe[key] == new, f"{key}: honoured but the recipe records {recipe[key]!r}"
        honoured.append(key)
    assert {"seed", "device", "study.name", "score.samples", "tracking.uri"} <= set(refused)
    assert {"loop.temperature", "train.epochs", "ple.lam"} <= set(honoured)
    if kind == "image":
        assert {"data.imbalance_ratio", "data.draw", "data.fresh_pool"} <= set(honoured)
        assert {"data.majority", "data.test_fraction", "classifier.epochs"} <= set(refused)
    else:
        assert "data.size" in honoured


def rows_of(paths: StudyPaths, real, name: str):
    return read_parquet(paths.real / real.files[name])


def test_each_seed_draws_its_own_real_data_and_the_file_holds_what_the_recipe_records(tmp_path):
    raw = tiny(study__name="draws", **GAUSSIAN)
    raw["lineages"] = [{"name": "base", "estimator": "mle", "seed": 0}, {"name": "twin", "estimator": "ple", "seed": 0},
                       {"name": "seed7", "estimator": "mle", "seed": 7},
                       {"name": "big", "estimator": "mle", "seed": 0, "set": {"data.size": 200}},
                       {"name": "shared", "estimator": "mle", "seed": 7, "set": {"data.draw": "shared"}}]
    p = validate(raw)
    paths = StudyPaths(tmp_path, "draws")
    real = prepare_real_data(p, paths)
    data = {name: rows_of(paths, real, name).pixels.ravel() for name in real.files}
    assert real.files["base"] == real.files["twin"]  # one seed, one draw: MLE and PLE pair on the same data
    assert not np.array_equal(data["base"], data["seed7"])  # another seed, other real data
    assert len(data["big"]) == 200 and len(data["base"]) == 20  # set: {data.size: 200} is honoured ...
    manifest = read_manifest(paths.real_manifest)
    assert manifest["draws"][real.files["big"]]["data.size"] == 200  # ... and recorded as it is
    assert lineage_recipe(p, p.lineage("big"))["data.size"] == 200
    assert np.array_equal(data["shared"], data["base"])  # data.draw: shared is the study seed's draw (seed 0)
    assert manifest["draws"][real.files["seed7"]]["data.draw_seed"] == 7


def test_an_image_draw_keeps_its_class_mix_and_its_fresh_pool_out_of_dataset_0(tmp_path):
    raw = tiny(study__name="pool", data__imbalance_ratio=4, data__fresh_pool=0.5)
    raw["lineages"] = [{"name": "a", "estimator": "mle", "seed": 0}, {"name": "b", "estimator": "mle", "seed": 1},
                       {"name": "r10", "estimator": "mle", "seed": 0, "set": {"data.imbalance_ratio": 10}}]
    p = validate(raw)
    paths = StudyPaths(tmp_path, "pool")
    real = prepare_real_data(p, paths)
    a, b = real.of("a"), real.of("b")
    for view, name in ((a, "a"), (b, "b")):
        counts = np.bincount(rows_of(paths, real, name).label, minlength=10)
        assert counts[3] == pytest.approx(4 * counts[6], abs=2)
        assert not set(view.train_index) & set(view.pool_index)  # the pool never enters dataset 0
        for c in (3, 6):
            assert (view.train_full.label[view.pool_index] == c).sum() == int(0.5 * (view.train_full.label == c).sum())
    assert not np.array_equal(a.train_index, b.train_index)  # another seed, other rows
    counts = np.bincount(rows_of(paths, real, "r10").label, minlength=10)
    assert counts[3] == pytest.approx(10 * counts[6], abs=5)


def test_fresh_without_a_pool_or_with_too_small_a_pool_is_refused_before_any_work(tmp_path):
    fresh = {"name": "f", "estimator": "mle", "mode": "fresh", "real_fraction": 0.2}
    paths = StudyPaths(tmp_path, "fresh")
    p = validate(tiny(study__name="fresh", lineages=[fresh]))
    assert "data.fresh_pool" in data_problem(p, paths, p.lineages)
    p = validate(tiny(study__name="fresh", lineages=[fresh], data__fresh_pool=0.05, loop__generations=5))
    problem = data_problem(p, paths, p.lineages)
    assert "data.fresh_pool" in problem and "the pool holds" in problem
    p = validate(tiny(study__name="fresh", lineages=[fresh], data__fresh_pool=0.6, loop__generations=3))
    assert data_problem(p, paths, p.lineages) is None
    assert not paths.data.exists()  # checking wrote nothing


@pytest.mark.fit
def test_a_fresh_lineage_never_trains_twice_on_the_same_real_image(tmp_path):
    from tests.kit import open_study, run_lineage

    fresh = {"name": "f", "estimator": "mle", "mode": "fresh", "real_fraction": 0.2, "seed": 3}
    study = open_study(tiny(study__name="fresh", lineages=[fresh], data__fresh_pool=0.6, loop__generations=3,
                            model__vae={"hidden": [32], "latent_dim": 4}), tmp_path)
    generations = run_lineage(study, "f", 3)
    pool = study.real.of("f")
    two_classes = pool.train_full.take(np.flatnonzero(np.isin(pool.train_full.label, [3, 6])))
    assert len({row.tobytes() for row in two_classes.pixels}) == len(two_classes)  # rows are told apart by bytes
    seen = {row.tobytes() for row in pool.train.pixels}  # dataset 0
    for k, generation in enumerate(generations):
        data = generation.next_dataset
        fresh_rows = data.pixels[data.origin == "real"]
        assert len(fresh_rows) > 0 and data.generation[data.origin == "real"].max() == 0
        new = {row.tobytes() for row in fresh_rows}
        assert len(new) == len(fresh_rows) and not new & seen, f"dataset {k + 1} repeats a real image"
        seen |= new
        labels = data.label[data.origin == "real"]
        assert (labels == 3).sum() > (labels == 6).sum() > 0  # dataset 0's class mix
