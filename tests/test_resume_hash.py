"""The resume hash is complete: for every params key, changing it redoes exactly the outputs it shapes.

For every key of the composed schema (so a new part's settings are covered without naming them here), the key is
changed to another valid value and each probe lineage is classified by what a resume would do with its outputs:

- **redone**: its recipe (resume hash) changed, and the stale-outputs message names the key;
- **re-scored**: only its score hash changed;
- **reused**: neither changed.

The classification is then checked against what the code does: for each lineage, every key classified *reused*
is changed at once and the lineage run again (plain functions, as the flow runs them): its datasets, models,
pictures and metrics must be byte-for-byte those of the unchanged run; every key classified *re-scored* is changed
at once: its datasets and models must be the same. A key that shapes outputs while missing from the recipe (the
issue's holes: dynamic_ratio's ``real_fraction``, the classifier and score settings behind group, importance and
dynamic_ratio lineages) fails here.

Probe lineages: one per estimator, loop mode and mitigation the image family supports (two generations, as some
parts act from generation 1 on: a classifier labels synthetic rows only once there are any), and for each 1-D family
one per estimator it supports, one generation (modes and mitigations are the same code whatever the family).
"""

from __future__ import annotations

import copy
import functools
import re
import typing
from typing import Any

import pytest

from models.estimators import ESTIMATORS
from models.families import FAMILIES
from tasks.mitigations import MITIGATIONS
from tasks.modes import MODES
from tasks.params import (ParamsError, digest, flatten, lineage_params, lineage_recipe, schema, score_recipe,
                          set_dotted, validate)
from tasks.registries import SOURCES
from tasks.resume import param_diff
from tasks.storage import json_safe
from tests.conftest import tiny
from tests.kit import open_study, run_lineage

pytestmark = pytest.mark.slow

GENERATIONS = {"image": 2, "scalar": 1}  # image: mitigations act from generation 1 on; 1-D probes are estimators only
# Keys no other valid value can be given in a probe, and why that is fine.
UNCHANGEABLE = {
    "lineages": "the probe's lineages themselves",
    "data.source": "the other sources of a kind need files on disk; data.source is in every recipe (real data)",
    "model.family": "the only family of its kind (image); it is in every recipe",
    "score.feature_extractor": "inception needs local Inception weights; it is a score setting",
}


def supported(registry, name: str, family: str) -> bool:
    supports = getattr(registry.get(name), "supports", None)
    return supports is None or supports(FAMILIES.get(family)) is None


def probes() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for family in FAMILIES.names():
        image = FAMILIES.get(family).kind == "image"
        base = tiny(study__name="probe") if image else tiny(
            study__name="probe", model__family=family, data__source="model", data__size=30, train__batch_size=30,
            ple__m=2, score__mc_samples=2000)
        base["model"] = {**base.get("model", {}), "vae": {"hidden": [32], "latent_dim": 4}} if image else base["model"]
        lineages = [{"name": f"e-{e}", "estimator": e} for e in ESTIMATORS.names() if supported(ESTIMATORS, e, family)]
        if image:
            lineages += [{"name": f"m-{m}", "estimator": "mle", "mode": m} for m in MODES.names() if m != "replace"]
            lineages += [{"name": f"x-{m}", "estimator": "mle", "mitigation": m} for m in MITIGATIONS.names()
                         if m != "none" and supported(MITIGATIONS, m, family)]
        base["lineages"] = lineages
        out.append((family, base))
    return out


def annotation_of(key: str):
    """The declared type of a key (None inside a plain dict field, such as studies.fig4.sizes)."""
    cls = schema()
    for part in key.split("."):
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            return None
        cls = fields[part].annotation
    return cls


def literal_choices(annotation) -> list:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return []


def candidates(key: str, value: Any):
    """Other values for ``key``, most natural first (the caller keeps the first that validates)."""
    yield from (c for c in literal_choices(annotation_of(key)) if c != value)
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value - 1, value * 2)
    elif isinstance(value, float):
        yield from (value * 1.5, value * 0.5, value + 0.1, 0.5)
    elif isinstance(value, str):
        names = [n for registry in (SOURCES, FAMILIES, MODES) for n in registry.names()]
        yield from (*(n for n in names if n != value), "bf16", "cpu", value + "x")
    elif value is None:
        yield from (100, 0.5, "x")
    elif isinstance(value, dict):  # a loop study's own params
        yield {**value, "train": {**value.get("train", {}), "epochs": 7}}
    elif isinstance(value, list):
        if value and isinstance(value[0], (int, float)) and not isinstance(value[0], bool):
            yield [bump(value[0]), *value[1:]]
        if len(value) > 1:
            yield value[:-1]
        if not value:
            yield ["tasks.modes"]  # plugins: a module that registers nothing new


def bump(number):
    return number + 1 if isinstance(number, int) else (number * 1.5 if number else 0.5)


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def changed_value(raw: dict[str, Any], key: str, value: Any):
    for candidate in candidates(key, value):
        if candidate == value:
            continue
        try:
            validate(with_values(raw, {key: candidate}))
        except ParamsError:
            continue
        return candidate
    return None


def hashes(raw: dict[str, Any]) -> dict[str, tuple[dict, str]]:
    p = validate(raw)
    return {lin.name: (lineage_recipe(p, lin), digest(score_recipe(lineage_params(p, lin)))) for lin in p.lineages}


def outputs(generations, score_too: bool) -> list[dict[str, Any]]:
    """What a resume would reuse: each generation's files by sha256 (and metrics, when scores must match too)."""
    out = []
    for g in generations:
        m = g.manifest
        files = {name: sha for name, sha in m["outputs"].items() if score_too or not name.endswith(".png")}
        out.append({"files": files, "data": m["data"], "trained_on": m["trained_on"]["data_sha256"],
                    **({"metrics": json_safe(m["metrics"])} if score_too else {})})  # NaN == NaN here
    return out


@pytest.mark.parametrize("family, raw", probes(), ids=[family for family, _ in probes()])
def test_every_key_redoes_rescores_or_reuses_exactly_what_it_shapes(family, raw, tmp_path):
    base_p = validate(raw)
    base = hashes(raw)
    # a loop study's own params (studies.<name>.params, or deeper: studies.lambda.datasets.<d>.params) are one
    # free-form key each: changed as a whole
    keys = list(dict.fromkeys(re.sub(r"^(studies\..*?\.params)\..*$", r"\1", k)
                              for k in flatten(base_p.model_dump(mode="json")) if not k.startswith("lineages")))
    keys += ["lineages"]
    groups: dict[str, dict[str, dict[str, Any]]] = {name: {"reused": {}, "rescored": {}} for name in base}
    verdicts: dict[str, dict[str, list[str]]] = {}
    dumped = flatten(base_p.model_dump(mode="json"))
    tree = base_p.model_dump(mode="json")
    dumped.update({k: functools.reduce(lambda node, part: node[part], k.split("."), tree) for k in keys
                   if k.endswith(".params") and k.startswith("studies.")})
    for key in keys:
        new = None if key == "lineages" else changed_value(raw, key, dumped[key])
        if new is None:
            assert key in UNCHANGEABLE, f"{key}: no other valid value found for it: add a candidate to this test"
            continue
        changed = hashes(with_values(raw, {key: new}))
        for name, (recipe, score) in base.items():
            new_recipe, new_score = changed[name]
            if new_recipe != recipe:
                diff = param_diff(recipe, new_recipe)
                assert any(line.startswith(f"{key}:") for line in diff), (key, name, diff)  # the message names it
                verdict = "redone"
            else:
                verdict = "rescored" if new_score != score else "reused"
                groups[name][verdict][key] = new
            verdicts.setdefault(key, {}).setdefault(verdict, []).append(name)

    # The holes, closed by what these parts declare:
    if family == "vae":
        for key in ("loop.real_fraction", "classifier.epochs", "score.samples"):
            assert "x-dynamic_ratio" in verdicts[key]["redone"], (key, verdicts[key])
        for key in ("classifier.epochs", "classifier.lr"):
            assert {"x-group", "x-importance"} <= set(verdicts[key]["redone"]), (key, verdicts[key])
        assert "e-mle" in verdicts["score.samples"]["rescored"] and "e-mle" in verdicts["device"]["reused"]

    generations = GENERATIONS[FAMILIES.get(family).kind]
    study = open_study(raw, tmp_path)
    reference = {name: run_lineage(study, name, generations) for name in base}
    for name, group in groups.items():
        for verdict, values in group.items():
            if not values:
                continue
            variant = with_values(raw, {**values, "study.name": f"{name}-{verdict}"})
            assert hashes(variant)[name][0] == base[name][0], (name, verdict)  # together, still the same recipe
            again = run_lineage(open_study(variant, tmp_path), name, generations)
            score_too = verdict == "reused"
            assert outputs(again, score_too) == outputs(reference[name], score_too), (
                f"lineage {name}: changing {sorted(values)} (not in its recipe) changed its outputs")
