from pathlib import Path

import pytest

from tasks.params import ParamsError, digest, lineage_recipe, load, validate
from tests.conftest import REPO


def test_repo_params_file_is_valid_and_complete():
    p = load(REPO / "params.yaml")
    assert p.data.source == "digits" and p.data.majority == 3 and p.data.minority == 6
    assert p.lineages and all(lineage.estimator for lineage in p.lineages)
    # Every key of the schema appears in params.yaml ("params.yaml holds every knob").
    import yaml

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(written) == set(type(p).model_fields)


def test_set_overrides_parse_as_yaml():
    p = load(None, ["loop.generations=2", "train.epochs=3", "lineages=[mle]", "data.imbalance_ratio=10"])
    assert p.loop.generations == 2 and p.train.epochs == 3 and p.data.imbalance_ratio == 10.0
    assert [lineage.name for lineage in p.lineages] == ["mle"]
    assert p.lineages[0].estimator == "mle"


@pytest.mark.parametrize("override, key", [
    ("data.source=imagenet", "data.source"),
    ("data.majority=11", "data.majority"),
    ("data.minority=3", "data.minority"),
    ("data.imbalance_ratio=0.5", "data.imbalance_ratio"),
    ("loop.generations=0", "loop.generations"),
    ("train.epochs=-1", "train.epochs"),
    ("train.batch_size=many", "train.batch_size"),
    ("loop.synthetic_size=-5", "loop.synthetic_size"),
    ("score.samples=0", "score.samples"),
    ("lineages=[nonsense]", "lineages.0.estimator"),
    ("lineages=[mle,mle]", "lineages"),
    ("model.family=gan9000", "model.family"),
    ("trian.epochs=3", "trian"),
    ("score.feature_extractor=inception", "score.inception_weights"),
    ("lineages=[{name: x, estimator: ple, set: {ple.lamb: 1}}]", "lineages"),
    ("lineages=[{name: x, estimator: mle, mitigation: nonsense}]", "lineages.0.mitigation"),
    ("loop.mode=shuffle", "loop.mode"),
    ("plugins=[no_such_module]", "plugins"),
])
def test_bad_params_name_the_key(override, key):
    with pytest.raises(ParamsError) as err:
        load(None, [override])
    message = str(err.value)
    assert message.startswith("invalid params: ")
    assert f"{key}:" in message, message
    assert "\n" not in message  # one line, one problem


def test_bad_set_syntax_and_missing_file():
    with pytest.raises(ParamsError, match="expected dotted.key=value"):
        load(None, ["train.epochs"])
    with pytest.raises(ParamsError, match="does-not-exist.yaml does not exist"):
        load(Path("does-not-exist.yaml"))


def test_cifar_class_names_are_accepted():
    p = validate({"data": {"source": "cifar10", "majority": "cat", "minority": "dog", "root": "x"}})
    assert (p.data.majority, p.data.minority) == (3, 5)


def test_recipe_hash_ignores_what_does_not_change_outputs():
    base = validate({})
    lineage = base.lineages[0]
    same = validate({"loop": {"generations": 9}, "device": "cpu", "score": {"samples": 10}})
    other = validate({"train": {"epochs": 7}})
    assert digest(lineage_recipe(base, lineage)) == digest(lineage_recipe(same, same.lineages[0]))
    assert digest(lineage_recipe(base, lineage)) != digest(lineage_recipe(other, other.lineages[0]))


def test_params_yaml_spells_out_the_defaults():
    # examples/*.yaml set only what they change; the rest must be what params.yaml shows the user.
    assert load(Path(__file__).resolve().parents[1] / "params.yaml") == validate({})


def test_a_lineage_overrides_any_key_for_itself_and_its_hash_follows():
    p = validate({"lineages": ["ple", {"name": "ple-lam1", "estimator": "ple", "set": {"ple.lam": 1.0}},
                               "hyper_nopenalty"]})
    recipes = {lineage.name: lineage_recipe(p, lineage) for lineage in p.lineages}
    assert recipes["ple"]["ple.lam"] == 0.1 and recipes["ple-lam1"]["ple.lam"] == 1.0
    assert recipes["hyper_nopenalty"]["ple.lam"] == 0.0  # fixed by the estimator entry
    assert {k for k in recipes["ple"] if recipes["ple"][k] != recipes["ple-lam1"][k]} == {"ple.lam", "lineage.name"}
    louder = validate({"ple": {"lam": 5.0}, "lineages": ["hyper_nopenalty"]})
    assert digest(lineage_recipe(louder, louder.lineages[0])) == digest(recipes["hyper_nopenalty"])
