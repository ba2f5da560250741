"""params.yaml: every knob of a study, validated before any work starts.

The schema is composed from the registries (``models.registry``): the core sections below (the study, the loop,
tracking, ...) plus every registered part's declared settings at the path it names (``model.vae``, ``train``,
``ple``, ``mitigation.importance``, ``studies.fig4``, ...). Several parts may declare settings at one path (the
data sources all add their fields to ``data``); the section is then the union of their fields. Each settings
class is the one home of its defaults.

The schema is strict (unknown keys are errors, so a typo never silently falls back to a default) and every
error names its dotted key, e.g. ``data.imbalance_ratio: must be >= 1 (got 0.5)``.

Which params decide which outputs follows from the same declarations: a lineage's recipe (its resume hash) is
the settings its parts declare (source, family, estimator, loop mode, mitigation) plus the core loop knobs, as
a flat ``{dotted params key: value}`` mapping; the metrics' recipe is the scorer's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml
from pydantic import (BaseModel, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, create_model,
                      field_validator, model_validator)

from models.estimators import ESTIMATORS
from models.families import FAMILIES
from models.registry import Registry, Settings, load_plugins, settings_of
from tasks.registries import IMAGE_METRICS, MITIGATIONS, MODES, SCORERS, SOURCES
from tasks.slurm import SlurmParams

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe as a folder name, an MLflow name and a DVC stage key
# A study or lineage name is a folder name (and <name>.dvc a file name) and an MLflow run name: at most 200
# characters, under MLflow's 250-character run names and the 255 bytes most filesystems allow a file name, with
# room for ".dvc". tasks.resume.check_world also checks the names against the filesystem the project is on.
NAME_MAX_CHARS = 200
MLFLOW_RUN_NAME_CHARS = 250  # MLflow's runs.name column
MAX_SEED = 2 ** 32 - 1  # numpy's and torch's seeds are 32-bit here


class ParamsError(ValueError):
    """Invalid params: the message names the key (or file) and what is wrong with it."""


Section = Settings  # a params section (strict pydantic; ``not_hashed`` lists fields that change no output)


# --- the core sections: what the loop itself reads ------------------------------------------------------------


class StudyParams(Section):
    name: str = Field("default", pattern=NAME_PATTERN, max_length=NAME_MAX_CHARS)


class DataParams(Section):
    """The real data: a source (``tasks.sources``: each adds its own fields here), the class imbalance, and how
    lineages draw their dataset 0 from the source's training split.

    ``draw``: ``per_seed`` (default) gives every lineage seed its own real draw (which minority rows, for the 1-D
    families which draws of the truth), so intervals over seeds include the real data's noise, and lineages of one
    seed (MLE, PLE, the control) pair on the same data; ``shared`` gives every lineage the study seed's draw.
    ``fresh_pool``: the share of each class's training rows kept out of dataset 0 for the ``fresh`` loop mode (real
    images no model of the lineage has seen)."""

    study_wide: ClassVar[frozenset[str]] = frozenset({"source", "majority", "minority", "max_per_class"})

    source: str = "digits"
    majority: int | str = 3
    minority: int | str = 6
    imbalance_ratio: float = Field(5.0, ge=1.0)  # R_I = majority count / minority count
    max_per_class: PositiveInt | None = None  # cap on real rows per class (quick runs on big sources)
    draw: Literal["per_seed", "shared"] = "per_seed"  # each lineage seed its own real draw, or the study seed's
    fresh_pool: float = Field(0.0, ge=0.0, lt=1.0)  # share of each class kept out of dataset 0 for `fresh`

    @field_validator("source")
    @classmethod
    def known_source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"unknown data source {value!r} (known: {', '.join(SOURCES.names())})")
        return value


class ModelParams(Section):
    family: str = "vae"  # each family's settings sit beside this, at model.<family>

    @field_validator("family")
    @classmethod
    def known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r} (known: {', '.join(FAMILIES.names())})")
        return value


class LoopParams(Section):
    not_hashed: ClassVar[frozenset[str]] = frozenset({"generations", "mode"})  # mode: hashed as the part's name

    generations: PositiveInt = 5
    mode: str = "replace"  # how dataset k+1 is made (tasks/modes)
    synthetic_size: PositiveInt | None = None  # new synthetic rows per generation; null = real training set size
    temperature: PositiveFloat = 1.0  # latent prior scale when sampling; < 1 models cherry-picking

    @field_validator("mode")
    @classmethod
    def known_mode(cls, value: str) -> str:
        if value not in MODES:
            raise ValueError(f"unknown loop mode {value!r} (known: {', '.join(MODES.names())})")
        return value


class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI, when set, wins
    experiment: str | None = None  # MLflow experiment; null = "madloop/<study.name>"
    # How a lineage's generations are recorded, decided before any fit (so any machine records the same runs):
    # batched (plain-function steps, MLflow records on the lineage's run only, dvc add once at the end) or per
    # generation (Prefect task steps, a nested MLflow run and a dvc add each). auto: batched for the scalar (1-D)
    # families, whose fits take milliseconds; per generation for the image families.
    batch_records: Literal["auto", "always", "never"] = "auto"

    @field_validator("uri")
    @classmethod
    def known_scheme(cls, value: str) -> str:
        problem = tracking_uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value


# The stores MLflow itself builds from a URI (mlflow.tracking._tracking_service.utils), plus any that an installed
# MLflow plug-in registers; "" is a local path.
MLFLOW_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc",
                  "uc")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow could not open ``uri`` (an unknown scheme), or None. Checked before any work: MLflow itself
    finds out only when the first run is logged, after training."""
    from importlib.metadata import entry_points
    from urllib.parse import urlparse

    scheme = uri if uri in ("databricks", "databricks-uc", "uc") else urlparse(uri).scheme.lower().split("+")[0]
    if len(scheme) == 1 or scheme in MLFLOW_SCHEMES:  # one letter: a Windows drive, a local path
        return None
    known = {*MLFLOW_SCHEMES, *(point.name for point in entry_points(group="mlflow.tracking_store"))}
    if scheme not in known:
        return (f"unsupported scheme {scheme!r} in {uri!r} (MLflow stores: "
                f"{', '.join(s + '://' for s in sorted(known) if s)} or a local path)")
    return None


class DvcParams(Section):
    track: bool = True  # dvc add every generation's outputs (needs a DVC repo at the project root)


CORE_SECTIONS: dict[str, type[Section]] = {
    "study": StudyParams, "data": DataParams, "model": ModelParams, "loop": LoopParams,
    "tracking": TrackingParams, "dvc": DvcParams, "slurm": SlurmParams,
}


class LineageParams(Section):
    """One recipe: an estimator, run as a chain of generations. ``mle`` in a list is short for {name: mle}.

    ``set`` overrides any params key for this lineage alone (``{ple.lam: 1.0}``): a lambda sweep is a list of
    lineages. ``mode`` and ``real_fraction`` are short for ``set: {loop.mode: ..., loop.real_fraction: ...}``."""

    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_CHARS)
    estimator: str | None = None  # default: the name itself
    seed: NonNegativeInt | None = Field(None, le=MAX_SEED)  # default: the study seed
    mode: str | None = None  # default: loop.mode
    real_fraction: float | None = Field(None, gt=0.0, lt=1.0)  # default: loop.real_fraction
    mitigation: str = "none"
    group: str | None = None  # the recipe this lineage is one seed of (set by ``seeds``; default: its name)
    set: dict[str, Any] = Field(default_factory=dict)  # dotted params key -> value, for this lineage only

    @model_validator(mode="after")
    def known_parts(self) -> "LineageParams":
        if self.estimator is None:
            object.__setattr__(self, "estimator", self.name)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: unknown estimator {self.estimator!r} for lineage {self.name!r} "
                             f"(known: {', '.join(ESTIMATORS.names())})")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode: unknown loop mode {self.mode!r} (known: {', '.join(MODES.names())})")
        if self.mitigation not in MITIGATIONS:
            raise ValueError(f"mitigation: unknown mitigation {self.mitigation!r} "
                             f"(known: {', '.join(MITIGATIONS.names())})")
        return self

    def overrides(self) -> dict[str, Any]:
        """Every params key this lineage sets for itself."""
        out = {"loop.mode": self.mode, "loop.real_fraction": self.real_fraction}
        return {**{k: v for k, v in out.items() if v is not None}, **self.set}


class ParamsBase(Section):
    """The root: a few top-level keys, then one field per section (added by :func:`schema`)."""

    seed: NonNegativeInt = Field(0, le=MAX_SEED)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    plugins: list[str] = Field(default_factory=list)  # modules to import first: a user's own registered parts
    lineages: list[LineageParams] = Field(
        default_factory=lambda: [LineageParams(name="mle"), LineageParams(name="ple")], min_length=1)

    @property
    def experiment(self) -> str:
        """The MLflow experiment this study logs to."""
        return self.tracking.experiment or f"madloop/{self.study.name}"  # never mistaken for MLflow's "Default"

    @field_validator("lineages", mode="before")
    @classmethod
    def expand_shorthand(cls, value: Any) -> Any:
        """``mle`` -> {name: mle}; {name: r, seeds: [0, 1]} -> lineages r-s0 and r-s1 of group r."""
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            item = {"name": item} if isinstance(item, str) else item
            if isinstance(item, dict) and "seeds" in item:
                rest = {k: v for k, v in item.items() if k != "seeds"}
                seeds = item["seeds"] if isinstance(item["seeds"], list) else [item["seeds"]]
                out += [{**rest, "name": f"{rest.get('name')}-s{seed}", "seed": seed,
                         "estimator": rest.get("estimator", rest.get("name")), "group": rest.get("name")}
                        for seed in seeds]
            else:
                out.append(item)
        return out

    @model_validator(mode="after")
    def cross_checks(self) -> "ParamsBase":
        names = [lineage.name for lineage in self.lineages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"lineages: duplicate lineage name(s) {', '.join(duplicates)}")
        source = SOURCES.get(self.data.source)
        family = FAMILIES.get(self.model.family)
        if source.kind != family.kind:
            kinds = [n for n in SOURCES.names() if SOURCES.get(n).kind == family.kind]
            raise ValueError(f"data.source: the {self.model.family} family ({family.kind}) needs a {family.kind} "
                             f"source ({', '.join(kinds)}), got {self.data.source!r}")
        for key in ("majority", "minority"):
            object.__setattr__(self.data, key, source.class_index(key, getattr(self.data, key)))
        if source.kind == "image" and self.data.majority == self.data.minority:
            raise ValueError(f"data.minority: must differ from data.majority (both {self.data.majority})")
        for lineage in self.lineages:
            for registry, name in ((ESTIMATORS, lineage.estimator), (MODES, lineage.mode or self.loop.mode),
                                   (MITIGATIONS, lineage.mitigation)):
                supports = getattr(registry.get(name), "supports", None)
                problem = supports(family) if supports is not None else None
                if problem:
                    raise ValueError(f"lineages: {registry.kind} {name!r} of lineage {lineage.name!r}: the "
                                     f"{self.model.family} family {problem}")
            if lineage.overrides():
                try:
                    lineage_params(self, lineage)
                except ParamsError as err:
                    raise ValueError(f"lineages: {err}") from None
        return self

    def lineage(self, name: str) -> LineageParams:
        for lineage in self.lineages:
            if lineage.name == name:
                return lineage
        raise ParamsError(f"lineage {name!r} is not in params lineages ({', '.join(l.name for l in self.lineages)})")


Params = ParamsBase  # the composed class is a subclass; annotate with this


# --- composing the schema from the registries ------------------------------------------------------------------


def declared_sections(every: bool = False) -> dict[str, list[type[Settings]]]:
    """dotted path -> the settings classes declared there (the core's and every registered part's; with ``every``,
    also those of registries whose settings are not the loop's, the paper studies')."""
    out: dict[str, list[type[Settings]]] = {path: [cls] for path, cls in CORE_SECTIONS.items()}
    for registry in Registry.all:
        if not (registry.in_params or every):
            continue
        for entry in registry.entries():
            for path, cls in entry.settings.items():
                if cls not in out.setdefault(path, []):
                    out[path].append(cls)
    return out


def merge(path: str, classes: list[type[Settings]], children: dict[str, type[Settings]]) -> type[Settings]:
    """One section class from every class declared at ``path`` (their fields' union) plus its subsections."""
    seen: dict[str, tuple[type, Any]] = {}
    for cls in classes:
        for name, info in cls.model_fields.items():
            if name in children:
                raise ParamsError(f"settings conflict: {path}.{name} is both a field of {cls.__name__} and a "
                                  "subsection")
            spec = (info.annotation, info.get_default(call_default_factory=True))
            if name in seen and seen[name] != spec:
                raise ParamsError(f"settings conflict: {path}.{name} is declared differently by two parts "
                                  f"({cls.__name__} and another)")
            seen[name] = spec
    if len(classes) == 1 and not children:
        return classes[0]
    fields = {name: (cls, Field(default_factory=cls)) for name, cls in children.items()}
    bases = tuple(classes) or (Section,)
    return create_model(f"Section_{path.replace('.', '_')}", __base__=bases, **fields)


@lru_cache(maxsize=8)
def _schema(version: int, studies: bool = False) -> type[ParamsBase]:
    declared = declared_sections(every=studies)
    paths = set(declared)
    for path in list(paths):  # every parent of a declared path is a section too
        parts = path.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
    built: dict[str, type[Settings]] = {}
    for path in sorted(paths, key=lambda p: -p.count(".")):
        children = {p.rsplit(".", 1)[1]: built[p] for p in built if p.rsplit(".", 1)[0] == path and "." in p}
        built[path] = merge(path, declared.get(path, []), children)
    top = {path: cls for path, cls in built.items() if "." not in path}
    clash = set(top) & set(ParamsBase.model_fields)
    if clash:
        raise ParamsError(f"settings conflict: {', '.join(sorted(clash))} is a top-level key, not a section")
    if not studies and STUDIES_KEY not in top:
        # the paper studies' settings, free-form: `madloop run` and `dvc repro study` read params.yaml, whose
        # `studies:` section only `madloop study` checks (with the studies' own schema: schema(studies=True))
        top_fields = {STUDIES_KEY: (dict[str, Any], Field(default_factory=dict))}
    else:
        top_fields = {}
    return create_model("Params", __base__=ParamsBase, **top_fields,
                        **{name: (cls, Field(default_factory=cls)) for name, cls in sorted(top.items())})


STUDIES_KEY = "studies"  # the paper studies' settings (flows.studies), outside the loop's schema


def schema(plugins: list[str] = (), studies: bool = False) -> type[ParamsBase]:
    """The params schema of every part registered now (after importing ``plugins``, each checked against
    :func:`plugin_problem` first). ``studies``: with the settings of registries kept out of the loop's params (the
    paper studies', registered by importing ``flows.studies``), as ``madloop study`` checks them."""
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(m, str) for m in plugins):
        raise ParamsError(f"invalid params: plugins: expected a list of module names (got {shown(plugins)})")
    for module in plugins:
        problem = plugin_problem(module)
        if problem:
            raise ParamsError(f"invalid params: plugins: {problem}")
    for module in plugins:
        try:
            load_plugins([module])
        except ImportError as err:
            raise ParamsError(f"invalid params: plugins: cannot import {err.name or module} "
                              f"({shown(str(err), 200)})") from None
        except Exception as err:  # the module's own code failed: one line, as for any bad input
            raise ParamsError(f"invalid params: plugins: importing {module} failed: {type(err).__name__}: "
                              f"{shown(str(err), 200)}") from None
    load_plugins([])
    return _schema(Registry.version, studies)


# --- plug-ins: params may name code to import, but only code this machine's owner allowed ----------------------

PLUGINS_ENV = "MADLOOP_PLUGINS"  # the modules (and their submodules) params may name in ``plugins``
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
OWN_PACKAGES = ("models", "tasks", "flows")  # madloop's own code: importing it runs nothing new


def allowed_plugins() -> set[str]:
    """The modules params ``plugins`` may import here: madloop's own packages, the modules installed packages
    declare in the ``madloop.plugins`` entry-point group (installing a package is trusting it; they are imported
    anyway), and the names in the environment variable ``MADLOOP_PLUGINS`` (comma- or space-separated), which
    whoever runs madloop sets, never a params file, ``--set``, a DVC experiment or a deployment's parameters."""
    from importlib.metadata import entry_points

    from models.registry import PLUGIN_GROUP

    import os

    named = re.split(r"[\s,]+", os.environ.get(PLUGINS_ENV, "").strip())
    return {*OWN_PACKAGES, *(point.value.split(":")[0] for point in entry_points(group=PLUGIN_GROUP)),
            *(name for name in named if name)}


def plugin_problem(module: str) -> str | None:
    """Why params may not import ``module`` (not a module name, or not allowed here), or None."""
    if not MODULE_NAME.fullmatch(module):
        return (f"{shown(module)} is not a module name (dotted Python identifiers; a relative import such as "
                "'.evil' is not allowed)")
    allowed = allowed_plugins()
    parts = module.split(".")
    if any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)):
        return None
    return (f"{module!r} is not allowed here: params choose no code of their own; whoever runs madloop allows a "
            f"module with {PLUGINS_ENV}={module} in the environment, or installs it under the "
            "madloop.plugins entry point (README, \"Trust\")")


# --- loading: hostile input is refused before it costs anything -----------------------------------------------

MAX_PARAMS_BYTES = 1 << 20  # a params file is at most 1 MiB (params.yaml is 10 KiB)
MAX_YAML_VALUES = 100_000  # values in a document with its aliases expanded (the largest example holds ~1,000)
SHOWN_CHARS = 60  # an error message quotes at most this much of any input
MAX_PROBLEMS = 5  # an error message lists at most this many problems (and says how many more)


class Yaml12Loader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (YAML 1.2): ``1e-3`` is a number, not the string PyYAML's YAML 1.1 makes
    of it (which the strict schema would refuse)."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A short repr of any input for an error message: bounded in length and in the work it takes (``repr`` of an
    alias bomb's value would build gigabytes)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxlong, short.maxother = 2, limit, limit, limit
    short.maxtuple = short.maxlist = short.maxarray = short.maxdict = short.maxset = short.maxfrozenset = 4
    try:
        text = short.repr(value)
    except (ValueError, RecursionError):  # an integer past Python's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cut(text: str, limit: int) -> str:
    """``text``, shortened to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def yaml_path(parts: list[Any]) -> str:
    return ".".join(str(part) for part in parts)


def check_yaml_tree(root: yaml.Node, where: str, prefix: list[Any]) -> None:
    """Refuse, naming the key, what DVC's YAML reader refuses (a key twice in one mapping: DVC's ruamel stops
    there, PyYAML lets the last one win, so ``dvc repro`` and ``madloop run`` would disagree) and what would make
    validation blow up: an anchor used inside itself, or aliases expanding to more than ``MAX_YAML_VALUES``
    values (a "billion laughs" file of ten lines expands to billions: every consumer, pydantic included, walks
    the expansion)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def children(node: yaml.Node) -> list[tuple[Any, yaml.Node]]:
        if isinstance(node, yaml.MappingNode):
            return [(key.value if isinstance(key, yaml.ScalarNode) else "?", value) for key, value in node.value]
        if isinstance(node, yaml.SequenceNode):
            return list(enumerate(node.value))
        return []

    def size(node: yaml.Node, path: list[Any]) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ParamsError(f"invalid params: {yaml_path(path) or '(top level)'}: {where}: an anchor is used inside "
                              "itself (a recursive alias)")
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                if (key.tag, key.value) in seen:
                    raise ParamsError(
                        f"invalid params: {yaml_path([*path, key.value])}: {where}: duplicate key (lines "
                        f"{seen[(key.tag, key.value)]} and {key.start_mark.line + 1}; DVC refuses such a file too)")
                seen[(key.tag, key.value)] = key.start_mark.line + 1
        total = 1 + sum(size(child, [*path, name]) + (1 if isinstance(node, yaml.MappingNode) else 0)
                        for name, child in children(node))
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    if size(root, prefix) <= MAX_YAML_VALUES:
        return
    def big(node: yaml.Node) -> list[tuple[Any, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            return []
        return [(name, child) for name, child in children(node) if sizes[id(child)] > MAX_YAML_VALUES]

    def too_big(node: yaml.Node, path: list[Any]) -> list[str]:
        """Each top-level key that is too big, followed down while one key alone below it is."""
        out = []
        for name, child in big(node) or [(None, node)]:
            where_, below = [*path, *([] if name is None else [name])], child
            while len(inner := big(below)) == 1:
                where_, below = [*where_, inner[0][0]], inner[0][1]
            out.append(yaml_path(where_) or "(top level)")
        return out

    keys = too_big(root, list(prefix))
    raise ParamsError(f"invalid params: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}: {where}: its "
                      f"aliases expand to {sizes[id(root)]:,} values, more than the {MAX_YAML_VALUES:,} a params "
                      "file may hold (an alias bomb?)")


def read_yaml(text: str, where: str, prefix: list[Any] = ()) -> tuple[bool, Any]:
    """(whether the document holds anything, its value), read as :func:`yaml_load` does, after the checks of
    :func:`check_yaml_tree`. ``where`` says where the text came from; ``prefix``: the key it sits under."""
    loader = Yaml12Loader(text)
    head = f"invalid params: {yaml_path(prefix)}: {where}" if prefix else where
    try:
        node = loader.get_single_node()
        if node is None:
            return False, None
        check_yaml_tree(node, where, list(prefix))
        return True, loader.construct_document(node)
    except ParamsError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ParamsError(f"{head} is not valid YAML: {cut(str(getattr(err, 'problem', None) or err), 200)}{at}") \
            from None
    except (ValueError, RecursionError) as err:  # an integer of 5,000 digits; nesting deeper than Python recurses
        what = "nested too deeply" if isinstance(err, RecursionError) else cut(str(err), 200)
        raise ParamsError(f"{head} is not valid params YAML: {what}") from None
    finally:
        loader.dispose()


def yaml_load(text: str) -> Any:
    return read_yaml(text, "YAML text")[1]


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=2`` -> ("train.epochs", 2); the value is read as YAML, so ``[mle,ple]`` is a list."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise ParamsError(f"--set {shown(text)}: expected dotted.key=value, e.g. train.epochs=2")
    key = key.strip()
    if len(raw.encode()) > MAX_PARAMS_BYTES:
        raise ParamsError(f"invalid params: {key}: a --set value of {len(raw.encode()):,} bytes (at most "
                          f"{MAX_PARAMS_BYTES:,})")
    return key, read_yaml(raw, "--set value", key.split("."))[1] if raw.strip() else None


def is_type_tag(part: Any) -> bool:
    """A union member's tag in a pydantic error location (``data.majority.int``), not a key."""
    return isinstance(part, str) and (part in ("int", "str", "float", "bool", "none", "list", "dict") or "[" in part
                                      or part.startswith(("constrained-", "function-", "lax-", "strict-")))


# keys that were renamed or removed: what a params file that still has them is told
RENAMED = {"tracking.cheap_fit_seconds": "renamed: how a lineage is recorded no longer depends on how long its fits "
                                         "took; use tracking.batch_records: auto | always | never (params.yaml)"}


def format_validation_error(err: ValidationError) -> str:
    """One line: every problem as ``dotted.key: what is wrong (got <a short prefix of the input>)``, at most
    ``MAX_PROBLEMS`` of them."""
    problems: list[str] = []
    union_keys: dict[str, int] = {}  # key -> index of its problem, so a union's members make one problem
    for e in err.errors(include_url=False):
        parts = [p for p in e["loc"] if not is_type_tag(p)]
        union = len(parts) < len(e["loc"])
        loc = cut(".".join(str(p) for p in parts), 2 * SHOWN_CHARS)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = RENAMED.get(loc, "unknown key (see params.yaml for every key)")
        # A model-level validator reports "key: problem"; anchor it under its section.
        head = msg.split(":", 1)[0]
        if ":" in msg and e["type"] == "value_error" and head.replace("_", "").replace(".", "").isalnum():
            rest = msg.split(":", 1)[1]
            loc = f"{loc}.{head}" if loc and not loc.endswith(head) else (loc or head)
            msg = rest.strip()
        msg = cut(msg, 8 * SHOWN_CHARS)  # a validator's message may quote the input
        got = "" if e["type"] in ("extra_forbidden", "missing") or e["type"] == "value_error" else \
            f" (got {shown(e.get('input'))})"
        if union and loc in union_keys:  # "should be a valid integer" or "... string": one problem
            i = union_keys[loc]
            problems[i] = problems[i].removesuffix(got) + f", or {msg[0].lower()}{msg[1:]}{got}"
            continue
        if union:
            union_keys[loc] = len(problems)
        problems.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    more = f"; and {len(problems) - MAX_PROBLEMS} more problem(s)" if len(problems) > MAX_PROBLEMS else ""
    return "invalid params: " + "; ".join(problems[:MAX_PROBLEMS]) + more


def validate(raw: dict[str, Any] | BaseModel | None, studies: bool = False) -> Params:
    """Params from a mapping (or params validated before): the loop's schema, or with ``studies`` the paper
    studies' too (:func:`schema`)."""
    if isinstance(raw, BaseModel):
        raw = raw.model_dump(mode="json")
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"invalid params: expected a mapping of sections, got {type(raw).__name__}")
    plugins = (raw or {}).get("plugins")
    try:
        p = schema([] if plugins is None else plugins, studies).model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(format_validation_error(err)) from None
    check_name_clashes(p)
    return p


# DVC's own file names: a lineage folder so named would be taken for (or clash with) DVC's files.
DVC_NAMES = ("dvc.yaml", "dvc.lock", "params.yaml")


def check_name_clashes(p: Params) -> None:
    """Names whose files would clash: a lineage ``mle.dvc`` beside ``mle`` (DVC writes ``mle.dvc`` for the folder
    ``mle``; any name ending in ``.dvc`` is taken for a DVC file, so ``dvc add`` refuses it, after all the work),
    DVC's own file names, and names that differ only in case (one folder on a case-insensitive filesystem)."""
    for key, name in [("study.name", p.study.name), *(("lineages", lineage.name) for lineage in p.lineages)]:
        if name.lower().endswith(".dvc"):
            raise ParamsError(f"invalid params: {key}: {shown(name)} ends in .dvc, DVC's file suffix (DVC would take "
                              "its folder for a DVC file, and the .dvc file of a folder so named clashes with it)")
        if name.lower() in DVC_NAMES:
            raise ParamsError(f"invalid params: {key}: {name!r} is the name of one of DVC's own files")
    if p.tracking.experiment is not None:  # the lineage runs are then named <study>/<lineage> (tasks.tracking)
        longest = max((lineage.name for lineage in p.lineages), key=len)
        if len(p.study.name) + 1 + len(longest) > MLFLOW_RUN_NAME_CHARS:
            raise ParamsError(f"invalid params: study.name: with tracking.experiment set, lineage runs are named "
                              f"<study>/<lineage>, and {p.study.name[:20]}.../{longest[:20]}... has "
                              f"{len(p.study.name) + 1 + len(longest)} characters: MLflow takes at most "
                              f"{MLFLOW_RUN_NAME_CHARS}")
    seen: dict[str, str] = {}
    for lineage in p.lineages:
        other = seen.setdefault(lineage.name.lower(), lineage.name)
        if other != lineage.name:
            raise ParamsError(f"invalid params: lineages: {other!r} and {lineage.name!r} differ only in case (one "
                              "folder on a case-insensitive filesystem)")


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"params file {path} does not exist")
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ParamsError(f"params file {path} is {size:,} bytes, more than a params file may be "
                              f"({MAX_PARAMS_BYTES:,})")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ParamsError(f"params file {path} is not UTF-8 text (byte {err.start})") from None
        present, raw = read_yaml(text, f"params file {path}")
        if not present:
            raise ParamsError(f"params file {path} is empty: expected a mapping of sections (`{{}}` for every "
                              "default)")
        if not isinstance(raw, dict):  # `[]`, `0`, `false`, `null`: not silently the default study
            got = "null" if raw is None else f"{type(raw).__name__} {json.dumps(raw) if raw in (True, False) else shown(raw)}"
            raise ParamsError(f"params file {path}: expected a mapping of sections at the top level, got {got}")
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def load(path: str | Path | None = None, overrides: list[str] = (), studies: bool = False) -> Params:
    """Read params.yaml (or defaults), apply ``--set`` overrides, validate (``studies``: :func:`validate`)."""
    return validate(load_raw(path, overrides), studies)


# --- hashing: which params decide which outputs -------------------------------------------------------------


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def section(p: BaseModel, path: str) -> BaseModel:
    node = p
    for key in path.split("."):
        node = getattr(node, key)
    return node


def share(p: Params, settings: dict[str, type[Settings]]) -> dict[str, Any]:
    """``{dotted key: value}`` of every field the given settings classes declare, read from ``p``."""
    out = {}
    for path, cls in settings.items():
        values = section(p, path).model_dump(mode="json")
        skip = cls.not_hashed
        out.update({f"{path}.{name}": values[name] for name in cls.model_fields if name not in skip})
    return out


def declared_settings(p: Params, settings: Mapping[str, type[Settings]]) -> dict[str, Settings]:
    """``{params path: settings}`` of each section a part declares, holding exactly the fields it declares, read from
    ``p``: what the part is given to read (so a field it did not declare, and no resume hash holds, is not there)."""
    return {path: settings_of(cls, section(p, path)) for path, cls in settings.items()}


def core_loop(p: Params) -> LoopParams:
    """The core knobs of ``p``'s ``loop`` section, without the fields loop modes add (``real_fraction``, ...): a part
    reads those from the settings it declares."""
    return settings_of(LoopParams, p.loop)


def lineage_seed(params: Params, lineage: LineageParams) -> int:
    return params.seed if lineage.seed is None else lineage.seed


# What a lineage's ``set:`` may not change: sections every lineage of a study shares (its name, where it records,
# and the scorer with its metrics, which score every lineage against the same references), the top-level keys that
# are not a lineage's, and every field a settings class declares ``study_wide`` (the data split, the classes).
STUDY_SECTIONS = ("study", "tracking", "dvc", "studies")
NOT_A_LINEAGES = {"seed": "a lineage's seed is its own `seed:` field (or `seeds: [...]` for several)",
                  "device": "the study runs on one device: set it for the whole study",
                  "plugins": "plug-ins are imported once, for the whole study", "lineages": "not a lineage's key"}


def study_wide_problem(key: str) -> str | None:
    """Why a lineage's ``set:`` may not carry ``key``, or None when the lineage can vary it."""
    top = key.split(".")[0]
    if top in NOT_A_LINEAGES:
        return NOT_A_LINEAGES[top]
    shared = [*STUDY_SECTIONS, *(path for registry in (SCORERS, IMAGE_METRICS) for entry in registry.entries()
                                 for path in entry.settings)]
    section_ = next((path for path in shared if key == path or key.startswith(path + ".")), None)
    if section_ is not None:
        return (f"{section_} is the whole study's (every lineage is recorded and scored the same way): set it for the "
                "whole study")
    for path, classes in declared_sections().items():
        if any(key == f"{path}.{name}" for cls in classes for name in cls.study_wide):
            return ("it decides the real data every lineage of the study shares (the split, the classes, the "
                    "scorer): set it for the whole study")
    return None


def lineage_params(p: Params, lineage: LineageParams) -> Params:
    """The params this lineage runs under: the study's, with the lineage's own overrides and the values its
    estimator fixes (``hyper_nopenalty``: ``ple.lam`` = 0). A ``set:`` key the lineage cannot vary is refused
    (:func:`study_wide_problem`): every key it carries is honoured."""
    for key in lineage.set:
        problem = study_wide_problem(key)
        if problem:
            raise ParamsError(f"lineage {lineage.name!r}: set: {key}: cannot vary per lineage: {problem}")
    raw = p.model_dump(mode="json")
    keys = {**lineage.overrides(), **ESTIMATORS.entry(lineage.estimator).fixed}
    if not keys:
        return p
    for key, value in keys.items():
        set_dotted(raw, key, value)
    raw["lineages"] = [{**lineage.model_dump(mode="json"), "mode": None, "real_fraction": None, "set": {}}]
    try:
        return validate(raw)
    except ParamsError as err:
        raise ParamsError(f"lineage {lineage.name!r}: {str(err).removeprefix('invalid params: ')}") from None


def real_data_recipe(p: Params) -> dict[str, Any]:
    """What decides the real train/test data (and so the classifier's training set)."""
    entry = SOURCES.entry(p.data.source)
    recipe = {"seed": p.seed, **share(p, {"data": DataParams}), **share(p, entry.settings)}
    if entry.obj.kind == "scalar":  # real data are draws from the family's truth
        recipe.update({"model.family": p.model.family, **family_share(p)})
    return recipe


def family_share(p: Params) -> dict[str, Any]:
    return share(p, FAMILIES.entry(p.model.family).settings)


def lineage_recipe(params: Params, lineage: LineageParams) -> dict[str, Any]:
    """What decides a lineage's datasets and models, as ``{dotted params key: value}``: the real data, the core
    loop knobs, and every setting its parts declare (family, estimator, loop mode, mitigation). Not the number of
    generations (more generations extend a lineage), not scoring, not the device or tracking."""
    p = lineage_params(params, lineage)
    parts = [FAMILIES.entry(p.model.family), ESTIMATORS.entry(lineage.estimator), MODES.entry(p.loop.mode),
             MITIGATIONS.entry(lineage.mitigation)]
    recipe = {**real_data_recipe(p), "lineage.name": lineage.name, "lineage.seed": lineage_seed(p, lineage),
              "lineage.estimator": lineage.estimator, "lineage.mitigation": lineage.mitigation,
              "model.family": p.model.family, "loop.mode": p.loop.mode, **share(p, {"loop": LoopParams})}
    for entry in parts:
        recipe.update(share(p, entry.settings))
    return recipe


def score_recipe(p: Params) -> dict[str, Any]:
    """What decides the metrics of a fixed model: the scorer's settings and the real test set."""
    scorer = SCORERS.get(FAMILIES.get(p.model.family).kind)
    return {**real_data_recipe(p), **share(p, scorer.settings())}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
