"""Extending madloop from outside the package: a toy estimator, loop mode and mitigation defined in this file run a
study through the real flow; a plug-in module is found through params' ``plugins`` and through the
``madloop.plugins`` entry-point group of another installed distribution."""

from __future__ import annotations

import importlib
import sys
import textwrap

import numpy as np
import pytest
from pydantic import Field, PositiveInt

import models.registry
from flows.loop import run_study, self_consuming_loop
from models.estimators import ESTIMATORS, TrainSettings
from models.estimators.mle import fit_mle
from models.registry import Registry, Settings
from tasks.datasets import Dataset, read_parquet
from tasks.mitigations import MITIGATIONS, Mitigation
from tasks.modes import MODES, LoopMode
from tasks.params import ParamsError, digest, lineage_recipe, validate
from tasks.resume import StaleOutputsError
from tasks.storage import read_json
from tests.conftest import tiny


class ShortTraining(Settings):
    fraction: float = Field(0.5, gt=0.0, le=1.0)  # share of train.epochs actually run


class KeepPrevious(Settings):
    keep: PositiveInt = 7  # rows of dataset k carried into dataset k+1


class ConstantWeight(Settings):
    weight: float = Field(2.0, gt=0.0)


def fit_short(family, x, *, train: TrainSettings, short: ShortTraining, seed, device, sample_weight=None):
    """MLE for a fraction of the epochs: an estimator with settings of its own."""
    epochs = max(1, round(train.epochs * short.fraction))
    model = fit_mle(family, x, train=train.model_copy(update={"epochs": epochs}), seed=seed, device=device,
                    sample_weight=sample_weight)
    model.info["epochs_run"] = epochs
    return model


class CarryOver(LoopMode):
    """Model k's samples plus the first ``keep`` rows of dataset k."""

    def next_dataset(self, k, current, synthetic):
        keep = self.context.settings["toy_mode"].keep  # the section it declared at registration
        return Dataset.concat([synthetic, current.take(np.arange(min(keep, len(current))))])


class Constant(Mitigation):
    """Every row weighs ``weight``; logs it."""

    def training_weights(self, k, dataset):
        weight = self.context.settings["mitigation.constant"].weight
        return np.full(len(dataset), weight), {"toy_weight": weight, "toy_rows": float(len(dataset))}


@pytest.fixture(scope="module", autouse=True)
def toy_parts():
    ESTIMATORS.register("short_mle", settings={"train": TrainSettings, "short": ShortTraining})(fit_short)
    MODES.register("carry_over", settings={"toy_mode": KeepPrevious})(CarryOver)
    MITIGATIONS.register("constant", settings={"mitigation.constant": ConstantWeight})(Constant)
    yield
    ESTIMATORS.remove("short_mle")
    MODES.remove("carry_over")
    MITIGATIONS.remove("constant")


def toy_params(**overrides):
    return tiny(lineages=[{"name": "toy", "estimator": "short_mle", "mode": "carry_over", "mitigation": "constant"}],
                train__epochs=4, **overrides)


def test_parts_defined_outside_the_package_own_their_settings_and_their_share_of_the_hash():
    p = validate(toy_params(short={"fraction": 0.25}))
    assert p.short.fraction == 0.25 and p.toy_mode.keep == 7 and p.mitigation.constant.weight == 2.0
    with pytest.raises(ParamsError, match="short.fractoin: unknown key"):
        validate(toy_params(short={"fractoin": 0.25}))
    recipe = lineage_recipe(p, p.lineages[0])
    assert {"short.fraction", "toy_mode.keep", "mitigation.constant.weight", "train.epochs"} <= set(recipe)
    assert not any(key.startswith("ple.") for key in recipe)  # read by no part of this lineage
    changed = {"short": {"fraction": 0.75}, "toy_mode": {"keep": 3}, "mitigation": {"constant": {"weight": 1.0}}}
    default = validate(toy_params())
    base = digest(lineage_recipe(default, default.lineages[0]))
    assert digest(recipe) != base  # short.fraction 0.25 vs its default 0.5
    for section, value in changed.items():
        other = validate(toy_params(**{section: value}))
        assert digest(lineage_recipe(other, other.lineages[0])) != base, section
    unrelated = validate(toy_params(ple={"lam": 5.0}))
    assert digest(lineage_recipe(unrelated, unrelated.lineages[0])) == base


@pytest.mark.slow
def test_a_study_of_toy_parts_runs_through_the_real_flow_and_resumes_by_their_settings(project, prefect_server):
    rows = self_consuming_loop(params=toy_params(), root=str(project))
    assert [(r["lineage"], r["generation"]) for r in rows] == [("toy", 0), ("toy", 1)]
    folder = project / "data" / "studies" / "tiny" / "toy"
    gen0 = read_json(folder / "gen-000.json")
    assert gen0["info"]["epochs_run"] == 2  # the estimator got its settings: 4 epochs x 0.5
    assert gen0["metrics"]["toy_weight"] == 2.0  # the mitigation's weights reached training and were logged
    real_rows = int(gen0["metrics"]["toy_rows"])
    produced = read_parquet(folder / "dataset-001.parquet")
    assert len(produced) == real_rows + 7 and (produced.origin == "real").sum() == 7  # the mode's rule

    with pytest.raises(StaleOutputsError, match="toy_mode.keep: 7 -> 3"):
        run_study(validate(toy_params(toy_mode={"keep": 3})), project)
    again = self_consuming_loop(params=toy_params(ple={"lam": 5.0}), root=str(project))  # not read: reused
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]
    assert read_json(folder / "gen-000.json")["recipe_hash"] == gen0["recipe_hash"]


def test_params_plugins_import_a_users_module_before_validation(tmp_path, monkeypatch):
    (tmp_path / "my_madloop_parts.py").write_text(textwrap.dedent('''
        from models.registry import Settings
        from tasks.modes import MODES, LoopMode

        class EveryOther(Settings):
            stride: int = 2

        @MODES.register("every_other", settings={"every_other": EveryOther})
        class EveryOtherMode(LoopMode):
            def next_dataset(self, k, current, synthetic):
                return synthetic.take(list(range(0, len(synthetic), self.context.settings["every_other"].stride)))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    params = {"plugins": ["my_madloop_parts"], "loop": {"mode": "every_other"}, "every_other": {"stride": 3}}
    with pytest.raises(ParamsError, match="plugins: 'my_madloop_parts' is not allowed here.*MADLOOP_PLUGINS"):
        validate(params)  # params alone choose no code: whoever runs madloop allows it
    assert "my_madloop_parts" not in sys.modules
    monkeypatch.setenv("MADLOOP_PLUGINS", "other_parts, my_madloop_parts")
    try:
        p = validate(params)
        assert p.every_other.stride == 3 and p.loop.mode == "every_other"
    finally:
        MODES.remove("every_other")
    monkeypatch.setenv("MADLOOP_PLUGINS", "no_such_module")
    with pytest.raises(ParamsError, match="invalid params: plugins: cannot import no_such_module"):
        validate({"plugins": ["no_such_module"]})


def test_an_installed_distribution_adds_parts_through_the_entry_point_group(tmp_path, monkeypatch):
    (tmp_path / "toy_family_plugin.py").write_text(textwrap.dedent('''
        from models.families import FAMILIES
        from models.families.analytic import Exponential, ExponentialSettings

        @FAMILIES.register("shifted_exponential", settings={"model.shifted_exponential": ExponentialSettings})
        class ShiftedExponential(Exponential):
            """An exponential family registered by another package."""
            name = "shifted_exponential"
    '''))
    info = tmp_path / "toy_family_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[madloop.plugins]\ntoy = toy_family_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(models.registry, "_loaded_entry_points", False)
    try:
        p = validate({"model": {"family": "shifted_exponential", "shifted_exponential": {"rate": 2.0}},
                      "data": {"source": "model"}, "lineages": ["mle"]})
        assert p.model.shifted_exponential.rate == 2.0
    finally:
        from models.families import FAMILIES

        FAMILIES.remove("shifted_exponential")
        sys.modules.pop("toy_family_plugin", None)


def test_every_registry_finds_its_built_in_parts():
    import flows.studies  # noqa: F401  (the paper studies register when `madloop study` loads them, not before)

    expected = {"model family": {"vae", "gmm", "uniform", "gaussian", "laplace", "geometric", "exponential",
                                 "pareto"},
                "estimator": {"mle", "ple", "hyper_nopenalty", "ple_closed"},
                "data source": {"digits", "mnist", "cifar10", "model"},
                "loop mode": {"replace", "accumulate", "augment", "fresh"},
                "mitigation": {"none", "importance", "group", "dynamic_ratio"},
                "image metric": {"fidelity", "fairness"}, "scorer": {"image", "scalar"},
                "paper study": {"fig4", "fig3", "table1", "fig2"}}
    found = {registry.kind: set(registry.names()) for registry in Registry.all}
    for kind, names in expected.items():
        assert names <= found[kind], kind


def test_a_plugin_with_a_misspelled_hook_is_refused_at_registration():
    from models.registry import Registry, misspelled_hooks, unknown_hooks
    from tasks.mitigations import MITIGATIONS, Mitigation
    from tasks.modes import MODES, LoopMode

    with pytest.raises(ValueError, match=r"^mitigation 'typo': Typo defines 'training_weight' \(the closest hook: "
                                         r"'training_weights'\), which is not a hook of Mitigation"):
        @MITIGATIONS.register("typo")
        class Typo(Mitigation):
            def training_weight(self, k, rows):  # the hook is training_weights: this would never be called
                return None, {}
    assert "typo" not in MITIGATIONS
    with pytest.raises(ValueError, match="'next_datasets' \\(the closest hook: 'next_dataset'\\)"):
        MODES.register("typo")(type("Typo", (LoopMode,), {"next_datasets": lambda self, k, c, s: s}))
    assert "typo" not in MODES
    # a public helper is refused as well (only hooks are ever called on a mode), with a name far from any hook
    with pytest.raises(ValueError, match=r"'shuffle' \(the closest hook: '\w+'\).*name a helper with a leading '_'"):
        @MODES.register("helper")
        class PublicHelper(LoopMode):
            def next_dataset(self, k, current, synthetic):
                return self.shuffle(synthetic)

            def shuffle(self, data):
                return data

    @MITIGATIONS.register("spelled-right")  # the hooks spelled right, and a helper named as one: accepted
    class SpelledRight(Mitigation):
        def training_weights(self, k, dataset):
            return self._weights(dataset), {}

        def _weights(self, dataset):
            return np.ones(len(dataset))
    try:
        assert MITIGATIONS.get("spelled-right") is SpelledRight
    finally:
        MITIGATIONS.remove("spelled-right")
    for registry in Registry.all:  # and no built-in part trips either check
        assert all(not misspelled_hooks(entry.obj) for entry in registry.entries()), registry.kind
    for registry, base in ((MODES, LoopMode), (MITIGATIONS, Mitigation)):
        assert registry.hook_base is base
        assert all(unknown_hooks(entry.obj, base) is None for entry in registry.entries()), registry.kind
