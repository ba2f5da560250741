"""params.yaml: every knob of a study, validated before any work starts.

The schema is strict (unknown keys are errors, so a typo never silently falls back to a default) and every
error names its dotted key, e.g. ``data.imbalance_ratio: must be >= 1 (got 0.5)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, field_validator, model_validator)

from models.estimators import ESTIMATORS
from models.families import FAMILIES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe as a folder name, an MLflow name and a DVC stage key
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SOURCE_CLASSES = {"digits": list(range(10)), "mnist": list(range(10)), "cifar10": list(range(10))}
IMAGE_SOURCES = tuple(SOURCE_CLASSES)


class ParamsError(ValueError):
    """Invalid params: the message names the key (or file) and what is wrong with it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StudyParams(Section):
    name: str = Field("default", pattern=NAME_PATTERN)


class DataParams(Section):
    source: Literal["digits", "mnist", "cifar10", "model"] = "digits"  # model: draw from the 1-D family's truth
    root: str | None = None  # local torchvision root for mnist/cifar10
    download: bool = False  # let torchvision download into root (default data/raw) when online
    majority: int | str = 3
    minority: int | str = 6
    imbalance_ratio: float = Field(5.0, ge=1.0)  # R_I = majority count / minority count
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)  # digits only: mnist and cifar10 ship a test split
    max_per_class: PositiveInt | None = None  # cap on real rows per class (quick runs on big sources)
    size: PositiveInt = 20  # source model: real rows drawn from the family's true distribution (n)

    @model_validator(mode="after")
    def classes_exist(self) -> "DataParams":
        if self.source == "model":
            return self
        for key in ("majority", "minority"):
            value = getattr(self, key)
            if isinstance(value, str) and self.source == "cifar10" and value in CIFAR10_CLASSES:
                value = CIFAR10_CLASSES.index(value)
            elif isinstance(value, str) and value.isdigit():
                value = int(value)
            if value not in SOURCE_CLASSES[self.source]:
                raise ValueError(f"{key}: unknown class {getattr(self, key)!r} for source {self.source!r} "
                                 f"(known: 0-9{', or a CIFAR-10 class name' if self.source == 'cifar10' else ''})")
            object.__setattr__(self, key, value)
        if self.majority == self.minority:
            raise ValueError(f"minority: must differ from majority (both {self.majority})")
        return self


class VAEParams(Section):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128, 128], min_length=1)
    latent_dim: PositiveInt = 8
    negative_slope: float = Field(0.2, ge=0.0)


class GMMParams(Section):
    means: list[float] = Field(default_factory=lambda: [0.0, 2.0], min_length=2, max_length=2)
    variances: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 1.0], min_length=2, max_length=2)
    minority_weight: float = Field(0.2, gt=0.0, lt=1.0)  # weight of the component at means[1]
    em_tol: PositiveFloat = 1e-8
    em_max_iter: PositiveInt = 10000


class UniformParams(Section):
    a: PositiveFloat = 1.0


class GaussianParams(Section):
    mean: float = 0.0
    std: PositiveFloat = 1.0


class LaplaceParams(Section):
    loc: float = 0.0
    scale: PositiveFloat = 1.0


class GeometricParams(Section):
    p: float = Field(0.5, gt=0.0, lt=1.0)


class ExponentialParams(Section):
    rate: PositiveFloat = 0.5


class ParetoParams(Section):
    b: PositiveFloat = 1.0


class ModelParams(Section):
    family: str = "vae"
    vae: VAEParams = Field(default_factory=VAEParams)
    # 1-D families: their true parameters (data.source: model draws the real data from them)
    gmm: GMMParams = Field(default_factory=GMMParams)
    uniform: UniformParams = Field(default_factory=UniformParams)
    gaussian: GaussianParams = Field(default_factory=GaussianParams)
    laplace: LaplaceParams = Field(default_factory=LaplaceParams)
    geometric: GeometricParams = Field(default_factory=GeometricParams)
    exponential: ExponentialParams = Field(default_factory=ExponentialParams)
    pareto: ParetoParams = Field(default_factory=ParetoParams)

    @field_validator("family")
    @classmethod
    def known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r} (known: {', '.join(FAMILIES.names())})")
        return value

    def family_options(self) -> dict[str, Any]:
        section = getattr(self, self.family, None)
        return section.model_dump() if section is not None else {}


class TrainParams(Section):
    epochs: PositiveInt = 500
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast forward passes (for GPUs; weights stay fp32)


LoopMode = Literal["replace", "accumulate", "augment", "fresh"]
Mitigation = Literal["none", "importance", "group", "dynamic_ratio"]


class LoopParams(Section):
    generations: PositiveInt = 5
    mode: LoopMode = "replace"  # how dataset k+1 is made (tasks/training.py: make_next_dataset)
    synthetic_size: PositiveInt | None = None  # new synthetic rows per generation; null = real training set size
    real_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # augment, fresh: share of real rows in dataset k+1
    temperature: PositiveFloat = 1.0  # latent prior scale when sampling; < 1 models cherry-picking


class MitigationParams(Section):
    reference_per_class: PositiveInt = 30  # balanced real reference set (importance): rows per study class
    max_ece: float = Field(0.05, gt=0.0)  # recalibrate the density-ratio classifier above this held-out ECE
    weight_clip: float = Field(20.0, gt=1.0)  # importance weights clipped to [1/clip, clip]


class PLEParams(Section):
    """The hypernetwork estimators (ple, hyper_nopenalty): paper Eq. 5 and 6."""

    lam: float = Field(0.1, ge=0.0)  # penalty weight lambda (paper: 0.1, App. J)
    m: PositiveInt = 1  # synthetic sets per step (paper: 100 for the 1-D families)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 96], min_length=1)  # h1 (paper)
    rank: PositiveInt | None = 4  # rank of the factorized h2 heads; null = the paper's full linear heads
    penalty_entries: PositiveInt | None = 4096  # weight entries sampled per step for the penalty; null = all
    penalty_every: PositiveInt = 4  # lazy penalty: every k-th step, weighted k * lam (1 = every step, Eq. 5)


class LineageParams(Section):
    """One recipe: an estimator, run as a chain of generations. ``mle`` in a list is short for {name: mle}."""

    name: str = Field(pattern=NAME_PATTERN)
    estimator: str | None = None  # default: the name itself
    seed: NonNegativeInt | None = None  # default: the study seed
    mode: LoopMode | None = None  # default: loop.mode
    real_fraction: float | None = Field(None, gt=0.0, lt=1.0)  # default: loop.real_fraction
    mitigation: Mitigation = "none"
    group: str | None = None  # the recipe this lineage is one seed of (set by ``seeds``; default: its name)

    @model_validator(mode="after")
    def known_estimator(self) -> "LineageParams":
        if self.estimator is None:
            object.__setattr__(self, "estimator", self.name)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: unknown estimator {self.estimator!r} for lineage {self.name!r} "
                             f"(known: {', '.join(ESTIMATORS.names())})")
        return self


class ClassifierParams(Section):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 1e-3
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=2, max_length=2)
    feature_dim: PositiveInt = 64


class ScoreParams(Section):
    samples: PositiveInt = 1000  # fresh samples drawn from each model for scoring
    feature_extractor: Literal["classifier", "inception"] = "classifier"
    inception_weights: str | None = None  # local torch-fidelity Inception weights (never downloaded)
    kid_subset_size: PositiveInt = 1000
    prc_neighborhood: PositiveInt = 3
    min_class_samples: PositiveInt = 10  # fewer generated images of a class than this: its FID is NaN
    mc_samples: PositiveInt = 100_000  # 1-D families: Monte Carlo draws for KL and Wasserstein-1 (paper: 1e5)


class Fig4Params(Section):
    """MADness of parameter estimates (§5.3, App. H.3): estimate, sample n from the estimate, re-estimate."""

    generations: PositiveInt = 50
    seeds: PositiveInt = 1000
    pareto_seeds: PositiveInt = 100  # as the paper
    distributions: list[Literal["uniform", "gaussian", "laplace", "geometric", "exponential", "pareto"]] = Field(
        default_factory=lambda: ["uniform", "gaussian", "laplace", "geometric", "exponential", "pareto"])
    sizes: dict[str, PositiveInt] = Field(default_factory=lambda: {
        "uniform": 20, "gaussian": 20, "laplace": 25, "geometric": 25, "exponential": 25, "pareto": 25})
    # the data-driven PLE: one hypernetwork per distribution, trained on simulated datasets (models/batched.py)
    lam: float = Field(1.0, ge=0.0)
    m: PositiveInt = 100
    penalty: Literal["mean", "per_set"] = "mean"
    steps: PositiveInt = 1500
    batch: PositiveInt = 32
    lr: PositiveFloat = 3e-3
    hidden: list[PositiveInt] = Field(default_factory=lambda: [16, 16])
    head_hidden: list[PositiveInt] = Field(default_factory=lambda: [16])
    spread: float = Field(10.0, gt=1.0)  # training box: truth x/÷ spread (scales), +-spread sd (locations)


class Fig3Params(Section):
    """GMM (§5.2): EM vs hypernetwork PLE over minority weights and training sizes."""

    minority_weights: list[float] = Field(default_factory=lambda: [0.5, 0.3, 0.2, 0.1, 0.05])
    sizes: list[PositiveInt] = Field(default_factory=lambda: [20, 50, 100, 500, 2000])
    seeds: PositiveInt = 100
    lam: float = Field(0.1, ge=0.0)
    m: PositiveInt = 10
    steps: PositiveInt = 500
    batch: PositiveInt = 256
    lr: PositiveFloat = 0.01
    hidden: list[PositiveInt] = Field(default_factory=lambda: [8, 8, 8])  # h1 (paper: three layers of 8)
    head_hidden: list[PositiveInt] = Field(default_factory=lambda: [8])
    em_tol: PositiveFloat = 1e-10
    em_max_iter: PositiveInt = 100000
    kl_samples: PositiveInt = 100_000


class Table1Params(Section):
    """Fairness (§5.1): the VAE on majority 3 vs minority 6 at several imbalance ratios."""

    ratios: list[float] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 2])
    estimators: list[str] = Field(default_factory=lambda: ["mle", "ple"])


class Fig2Params(Section):
    """The MAD curve (Fig. 2): the full replace loop, MLE vs PLE, several seeds."""

    generations: PositiveInt = 5
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 2])
    estimators: list[str] = Field(default_factory=lambda: ["mle", "ple"])


class StudiesParams(Section):
    fig4: Fig4Params = Field(default_factory=Fig4Params)
    fig3: Fig3Params = Field(default_factory=Fig3Params)
    table1: Table1Params = Field(default_factory=Table1Params)
    fig2: Fig2Params = Field(default_factory=Fig2Params)


class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI, when set, wins
    experiment: str | None = None  # MLflow experiment; null = study.name


class DvcParams(Section):
    track: bool = True  # dvc add every generation's outputs (needs a DVC repo at the project root)


class Params(Section):
    study: StudyParams = Field(default_factory=StudyParams)
    seed: NonNegativeInt = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    ple: PLEParams = Field(default_factory=PLEParams)
    loop: LoopParams = Field(default_factory=LoopParams)
    mitigation: MitigationParams = Field(default_factory=MitigationParams)
    lineages: list[LineageParams] = Field(
        default_factory=lambda: [LineageParams(name="mle"), LineageParams(name="ple")], min_length=1)
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    dvc: DvcParams = Field(default_factory=DvcParams)
    studies: StudiesParams = Field(default_factory=StudiesParams)  # the paper reproductions (madloop study)

    @property
    def experiment(self) -> str:
        """The MLflow experiment this study logs to."""
        return self.tracking.experiment or self.study.name

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
    def cross_checks(self) -> "Params":
        names = [lineage.name for lineage in self.lineages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"lineages: duplicate lineage name(s) {', '.join(duplicates)}")
        family = FAMILIES.get(self.model.family)
        if family.kind == "scalar" and self.data.source != "model":
            raise ValueError(f"data.source: the {self.model.family} family draws its real data from its true "
                             f"distribution: set data.source: model (got {self.data.source!r})")
        if family.kind == "image" and self.data.source not in IMAGE_SOURCES:
            raise ValueError(f"data.source: the {self.model.family} family needs images "
                             f"({', '.join(IMAGE_SOURCES)}), got {self.data.source!r}")
        for lineage in self.lineages:
            if family.kind == "scalar" and lineage.mitigation != "none":
                raise ValueError(f"lineages: mitigation {lineage.mitigation!r} of lineage {lineage.name!r} needs "
                                 f"labelled groups (an image family), not the 1-D {self.model.family} family")
            if lineage.estimator == "ple_closed" and not getattr(family, "has_closed_ple", False):
                closed = [n for n in FAMILIES.names() if getattr(FAMILIES.get(n), "has_closed_ple", False)]
                raise ValueError(f"lineages: ple_closed has no closed form for the {self.model.family} family "
                                 f"(only {', '.join(closed)})")
        if self.score.feature_extractor == "inception" and not self.score.inception_weights:
            raise ValueError("score.inception_weights: required when score.feature_extractor is 'inception' "
                             "(a local torch-fidelity Inception weights file; madloop never downloads it)")
        return self

    def lineage(self, name: str) -> LineageParams:
        for lineage in self.lineages:
            if lineage.name == name:
                return lineage
        raise ParamsError(f"lineage {name!r} is not in params lineages ({', '.join(l.name for l in self.lineages)})")


# --- loading -------------------------------------------------------------------------------------------------


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
        raise ParamsError(f"--set {text!r}: expected dotted.key=value, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML ({err.problem})") from None
    return key.strip(), value


def format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (see params.yaml for every key)"
        # A model-level validator reports "key: problem"; anchor it under its section.
        if msg.split(":", 1)[0].replace("_", "").isalnum() and ":" in msg and e["type"] == "value_error":
            key, rest = msg.split(":", 1)
            loc = f"{loc}.{key}" if loc and not loc.endswith(key) else (loc or key)
            msg = rest.strip()
        shown = "" if e["type"] in ("extra_forbidden", "missing") or e["type"] == "value_error" else \
            f" (got {e.get('input')!r})"
        problems.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid params: " + "; ".join(problems)


def validate(raw: dict[str, Any] | None) -> Params:
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"invalid params: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(format_validation_error(err)) from None


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"params file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"params file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"params file {path}: expected a mapping of sections at the top level")
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Params:
    """Read params.yaml (or defaults), apply ``--set`` overrides, validate."""
    return validate(load_raw(path, overrides))


# --- hashing: which params decide which outputs -------------------------------------------------------------


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def lineage_seed(params: Params, lineage: LineageParams) -> int:
    return params.seed if lineage.seed is None else lineage.seed


def real_data_recipe(params: Params) -> dict[str, Any]:
    """What decides the real train/test data (and so the classifier's training set)."""
    if params.data.source == "model":  # 1-D truth: the family and its true parameters, the sample size
        return {"seed": params.seed, "data": {"source": "model", "size": params.data.size},
                "truth": {"family": params.model.family, **params.model.family_options()}}
    return {"seed": params.seed, "data": params.data.model_dump(exclude={"download", "size"})}


def lineage_mode(params: Params, lineage: LineageParams) -> tuple[str, float]:
    return lineage.mode or params.loop.mode, lineage.real_fraction or params.loop.real_fraction


def lineage_recipe(params: Params, lineage: LineageParams) -> dict[str, Any]:
    """What decides a lineage's datasets and models. Not the number of generations (more generations extend a
    lineage), not scoring, not the device or tracking, not the knobs of other families or estimators."""
    hyper = lineage.estimator in ("ple", "hyper_nopenalty")
    mode, real_fraction = lineage_mode(params, lineage)
    return {
        "real": real_data_recipe(params),
        "model": {"family": params.model.family, **params.model.family_options()},
        "train": params.train.model_dump(),
        "ple": params.ple.model_dump() if hyper else None,
        "loop": {"mode": mode, "synthetic_size": params.loop.synthetic_size, "temperature": params.loop.temperature,
                 "real_fraction": real_fraction if mode in ("augment", "fresh") else None},
        "mitigation": params.mitigation.model_dump() if lineage.mitigation == "importance" else None,
        "lineage": {**lineage.model_dump(exclude={"mode", "real_fraction", "group"}),
                    "seed": lineage_seed(params, lineage)},
    }


def score_recipe(params: Params) -> dict[str, Any]:
    """What decides the metrics of a fixed model: the scorer and the real test set."""
    return {"real": real_data_recipe(params), "classifier": params.classifier.model_dump(),
            "score": params.score.model_dump()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
