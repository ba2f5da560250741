"""Contract tests over every registered part, in scikit-learn's ``check_estimator`` spirit: whatever a mode or a
mitigation does, it keeps what the rest of the loop relies on. A new part registered in the package is checked
here without a line of test code of its own."""

from __future__ import annotations

import numpy as np
import pytest

from models.families import FAMILIES
from tasks.datasets import REAL, SYNTHETIC, Dataset, read_parquet, write_parquet
from tasks.mitigations import MITIGATIONS
from tasks.modes import MODES
from tests.conftest import tiny
from tests.kit import open_study, run_lineage

pytestmark = pytest.mark.fit  # one generation of a tiny model per part

RECIPES = {**{f"mode-{m}": {"estimator": "mle", "mode": m, "set": {"data.fresh_pool": 0.5}} for m in MODES.names()},
           **{f"mitigation-{m}": {"estimator": "mle", "mitigation": m} for m in MITIGATIONS.names()}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    lineages = [{"name": name, **recipe} for name, recipe in RECIPES.items()]
    return open_study(tiny(lineages=lineages, device="cpu", loop__generations=1, loop__real_fraction=0.5),
                      tmp_path_factory.mktemp("contracts"))


def check_schema(data: Dataset, like: Dataset, tmp_path, name: str) -> None:
    """A dataset the loop can write, read back unchanged and trace: dataset 0's columns and types, rows labelled
    real (generation 0, no lineage) or synthetic (a generation >= 1 and this lineage)."""
    assert isinstance(data, Dataset) and len(data) > 0
    assert data.pixels.dtype == np.float32 and data.shape == like.shape and data.source == like.source
    assert data.label.dtype == np.int64 and data.generation.dtype == np.int64
    assert set(data.origin) <= {REAL, SYNTHETIC}
    real, synthetic = data.origin == REAL, data.origin == SYNTHETIC
    assert (data.generation[real] == 0).all() and all(lineage is None for lineage in data.lineage[real])
    assert (data.generation[synthetic] >= 1).all() and set(data.lineage[synthetic]) <= {name}
    path = tmp_path / f"{name}.parquet"
    write_parquet(data, path)
    back = read_parquet(path)
    for field in ("pixels", "label", "origin", "generation", "lineage"):
        assert np.array_equal(getattr(back, field), getattr(data, field)), field


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_mode_and_mitigation_keeps_the_loops_contract(name, study, tmp_path):
    lineage = study.lineage(name)
    dataset0 = lineage.real.train
    # supports: None or a reason, for every family (a part that cannot run a family says so before any work)
    for family in FAMILIES.names():
        for part in (type(lineage.mode), type(lineage.mitigation)):
            reason = part.supports(FAMILIES.get(family))
            assert reason is None or (isinstance(reason, str) and reason), (part, family)
    # candidates(n) >= n, and select keeps exactly n of them, all model k's samples
    for n in (1, 7, 40):
        drawn = lineage.mitigation.candidates(n)
        assert isinstance(drawn, int) and drawn >= n
        candidates = Dataset.synthetic(np.random.default_rng(n).random((drawn, *dataset0.shape), dtype=np.float32),
                                       name, 1, dataset0.source)
        kept, info = lineage.mitigation.select(0, candidates, n)
        assert len(kept) == n and (kept.origin == SYNTHETIC).all() and (kept.generation == 1).all()
        assert all(isinstance(v, float) or isinstance(v, int) for v in info.values())
    # training weights: none, or one finite non-negative weight per row
    weights, _ = lineage.mitigation.training_weights(0, dataset0)
    if weights is not None:
        assert weights.shape == (len(dataset0),) and np.isfinite(weights).all() and (weights >= 0).all()
    # a real generation through the runner: its next dataset keeps the schema and the provenance
    generation, = run_lineage(study, name, 1)
    check_schema(generation.next_dataset, dataset0, tmp_path, name)
    assert np.array_equal(read_parquet(generation.next_path).pixels, generation.next_dataset.pixels)
