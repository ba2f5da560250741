import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

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
    # examples/*.yaml set only what they change; the rest must be what params.yaml shows the user, the paper
    # studies' settings included (checked with their schema, as `madloop study` reads them)
    import flows.studies  # noqa: F401  (registers the paper studies)

    assert load(Path(__file__).resolve().parents[1] / "params.yaml", studies=True) == validate({}, studies=True)


def test_the_loop_schema_takes_the_studies_settings_unchecked_and_madloop_study_checks_them():
    import flows.studies  # noqa: F401  (registered: still not the loop's)

    typo = {"studies": {"fig4": {"seedz": 3}}}
    assert validate(typo).studies == typo["studies"]  # `madloop run` and `dvc repro study` do not read them
    with pytest.raises(ParamsError, match=r"studies\.fig4\.seedz"):
        validate(typo, studies=True)


def test_a_lineage_overrides_any_key_for_itself_and_its_hash_follows():
    p = validate({"lineages": ["ple", {"name": "ple-lam1", "estimator": "ple", "set": {"ple.lam": 1.0}},
                               "hyper_nopenalty"]})
    recipes = {lineage.name: lineage_recipe(p, lineage) for lineage in p.lineages}
    assert recipes["ple"]["ple.lam"] == 0.1 and recipes["ple-lam1"]["ple.lam"] == 1.0
    assert recipes["hyper_nopenalty"]["ple.lam"] == 0.0  # fixed by the estimator entry
    assert {k for k in recipes["ple"] if recipes["ple"][k] != recipes["ple-lam1"][k]} == {"ple.lam", "lineage.name"}
    louder = validate({"ple": {"lam": 5.0}, "lineages": ["hyper_nopenalty"]})
    assert digest(lineage_recipe(louder, louder.lineages[0])) == digest(recipes["hyper_nopenalty"])


# --- hostile values: every number finite, every type strict, before any work ----------------------------------

def typed_keys(kind: type) -> dict[str, bool]:
    """Every dotted key of the composed schema that holds a ``kind`` (or a list of them: True), so a new part's
    settings are covered without naming them here."""
    from tasks.params import schema

    def holds(annotation) -> bool:  # kind, or a union with it (kind | None)
        if typing.get_origin(annotation) is typing.Annotated:  # PositiveInt
            annotation = typing.get_args(annotation)[0]
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        return annotation is kind or (union and kind in typing.get_args(annotation))

    out: dict[str, bool] = {}

    def walk(cls, prefix):
        for name, info in cls.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif holds(ann):
                out[f"{prefix}{name}"] = False
            elif typing.get_origin(ann) is list and holds(typing.get_args(ann)[0]):
                out[f"{prefix}{name}"] = True
    walk(schema(), "")
    return out


def refused(key: str, is_list: bool, bad: str) -> str:
    with pytest.raises(ParamsError) as err:
        load(None, [f"{key}=[{bad}]" if is_list else f"{key}={bad}"])
    return str(err.value)


def test_every_float_knob_refuses_infinity_and_nan():
    keys = typed_keys(float)
    assert {"train.lr", "loop.temperature", "ple.lam", "data.imbalance_ratio", "model.gmm.means"} <= set(keys)
    for key, is_list in keys.items():
        for bad in (".inf", "-.inf", ".nan"):
            message = refused(key, is_list, bad)
            where = f"{key}.0" if is_list else key
            assert f"{where}: Input should be a finite number" in message, (key, bad, message)


def test_every_integer_knob_refuses_booleans_and_fractions():
    keys = {k: v for k, v in typed_keys(int).items() if k not in ("data.majority", "data.minority")}  # int | str
    assert {"loop.generations", "train.epochs", "seed", "ple.hidden"} <= set(keys)
    for key, is_list in keys.items():
        for bad in ("true", "2.5"):
            message = refused(key, is_list, bad)
            where = f"{key}.0" if is_list else key
            assert f"{where}: Input should be a valid integer" in message, (key, bad, message)


@pytest.mark.parametrize("override, key", [
    ("dvc.track=1", "dvc.track"),
    ("train.lr=fast", "train.lr"),
    ("train.epochs='5'", "train.epochs"),
    ("data.majority=true", "data.majority"),
    ("seed=99999999999999999999999", "seed"),
    ("seed=-1", "seed"),
    ("lineages=[{name: a, estimator: mle, seeds: [4294967296]}]", "lineages.0.seed"),
    ("tracking.uri=foo://bar", "tracking.uri"),
])
def test_hostile_values_name_their_key_in_one_line(override, key):
    with pytest.raises(ParamsError) as err:
        load(None, [override])
    message = str(err.value)
    assert message.startswith(f"invalid params: {key}:") and "\n" not in message, message


def test_numbers_read_as_yaml_1_2_like_dvc_does():
    p = load(None, ["train.lr=1e-4", "ple.lam=2E-1", "model.gmm.em_tol=1.0e-8"])
    assert p.train.lr == 1e-4 and p.ple.lam == 0.2 and p.model.gmm.em_tol == 1e-8


def test_tracking_uris_of_every_mlflow_store_are_accepted():
    for uri in ("sqlite:///mlflow.db", "postgresql+psycopg2://u@db/mlflow", "http://mlflow:5000", "/srv/mlruns",
                "file:///srv/mlruns", "databricks"):
        assert load(None, [f"tracking.uri={uri}"]).tracking.uri == uri


def test_a_device_this_machine_lacks_is_a_params_error():
    import torch

    from tasks.generation import resolve_device

    name = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ParamsError, match=r"^invalid params: device: .* is not available here"):
        resolve_device(name)
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("override, key", [
    ("study.name=fig4", "study.name"),
    ("study.name=table1-ri5", "study.name"),
    ("study.name=RESULTS.md", "study.name"),
    ("study.name=results.md", "study.name"),
    ("tracking.experiment=fig2", "tracking.experiment"),
])
def test_names_that_belong_to_the_paper_or_the_reports_are_refused(override, key, tmp_path):
    from flows.cli import paper_studies
    from tasks.resume import check_names

    with pytest.raises(ParamsError) as err:
        check_names(load(None, [override]), tmp_path, paper_studies())
    assert str(err.value).startswith(f"invalid params: {key}:"), str(err.value)
    check_names(load(None, ["study.name=fig4b", "tracking.experiment=mine"]), tmp_path, paper_studies())  # near misses


def test_a_renamed_key_says_what_replaced_it():
    with pytest.raises(ParamsError, match=r"tracking\.cheap_fit_seconds: renamed.*tracking\.batch_records"):
        validate({"tracking": {"cheap_fit_seconds": 1.0}})
