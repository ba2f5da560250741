"""The paper's evidence, one plug-in per study: ``madloop study fig4 | fig3 | table1 | fig2 | results``.

A paper study is a class registered by name with its settings (at ``studies.<name>`` in params), in a module of
this package that holds everything about it: its computation, its figure and its RESULTS.md section with its
verdict rule. One generic flow (:func:`paper_study`) runs any of them: it writes the study's CSVs and PNGs under
``reports/<name>/``, logs to the MLflow experiment ``<name>`` and records the run time; :func:`write_results`
renders RESULTS.md from every study's section. Each study is a DVC stage whose deps are its own module and the
code it imports (dvc.yaml; a test checks them against the imports), so editing one study stales only its stage.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from pydantic import Field, NonNegativeInt, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.families import FAMILIES
from models.registry import Registry, Settings
from tasks.layout import RESULTS_MD, TIMING_JSON, reports_folder, studies_folder
from tasks.params import Params, ParamsError, flatten, validate
from tasks.storage import write_atomic, write_json_atomic
from tasks.stats import VERDICT_RULE, adjusted, verdict
from tasks.tracking import log_study_run, tracking_uri

PAPER = "Mayer et al., Improving Fairness and Mitigating MADness in Generative Models"


@dataclass
class StudyRun:
    """What a study's ``run`` gets: its validated params and settings, where to write, the MLflow store."""

    name: str
    params: Params
    settings: Any  # params.studies.<name>
    project: Path
    folder: Path  # reports/<name>/
    uri: str
    logger: Any

    def log(self, run_name: str, curves: dict[str, list[tuple[int, float]]], tags: dict[str, str],
            artifacts: list[str] = ()) -> str:
        """A finished MLflow run in the study's experiment: its settings as params, curves, artifacts."""
        return log_study_run(self.uri, self.name, run_name, self.project, flatten(self.settings.model_dump()), curves,
                             {"study": self.name, **tags}, [self.folder / a for a in artifacts])


class PaperStudy:
    """A study of the paper: ``run`` computes and writes its reports; ``section`` renders its RESULTS.md part."""

    order = 100  # position in RESULTS.md
    title = ""
    params: tuple[str, ...] = ()  # params sections its DVC stage reads besides seed and studies.<name>

    @classmethod
    def run(cls, study: StudyRun) -> dict[str, Any]:
        """Compute, write the reports, log; return extra timing facts."""
        raise NotImplementedError

    @classmethod
    def section(cls, folder: Path) -> list[str]:
        raise NotImplementedError


# in_params=False: the studies' settings (studies.<name>) are checked by `madloop study` only (validate(...,
# studies=True)); a loop study's params never import this package
STUDIES: Registry[type[PaperStudy]] = Registry("paper study", package="flows.studies", in_params=False)


# --- running one ------------------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    return (f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}")


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def ticker(bar: Progress, description: str) -> Callable[[int, int], None]:
    task_id = bar.add_task(description, total=None)
    return lambda done, total: bar.update(task_id, completed=done, total=total)


@contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to ``count`` inside the block (None: unchanged), restored after: studies that
    run several computations at once on a thread pool give each one thread."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@flow(name="paper-study", flow_run_name="{name}")
def paper_study(name: str, params: dict | None = None, root: str = ".") -> dict[str, Any]:
    """One paper study: its reports under reports/<name>/, its runs in the MLflow experiment <name>."""
    logger = get_run_logger()
    p = validate(params, studies=True)
    study = STUDIES.get(name)
    project = Path(root).resolve()
    folder = reports_folder(project, name)
    folder.mkdir(parents=True, exist_ok=True)
    run = StudyRun(name, p, getattr(p.studies, name), project, folder, tracking_uri(p.tracking.uri, project), logger)
    started = time.perf_counter()
    extra = study.run(run)
    timing = {"study": name, "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_json_atomic(folder / TIMING_JSON, timing)
    run.log(f"{name} report", {}, {}, sorted(f.name for f in folder.iterdir() if f.is_file()))
    logger.info(f"{name} finished in {timing['seconds']} s")
    return timing


def run(name: str, p: Params, root: Path) -> dict[str, Any]:
    return paper_study(name=name, params=p.model_dump(mode="json"), root=str(root))


# --- helpers the loop studies share ------------------------------------------------------------------------------


# The paper's VAE (§5.1): "an encoder and decoder, each with 5 layers containing a fully connected layer with
# batchnorm and leaky ReLU". The widths are not given; these are ours, sized for the data.
PAPER_VAE_DIGITS = {"hidden": [256, 128, 128, 64, 32], "latent_dim": 8}  # 8x8 digits
PAPER_VAE_MNIST = {"hidden": [512, 512, 256, 128, 64], "latent_dim": 16}  # 28x28: about 1.7M weights
# Training at 28x28: 128 images a step, about the Adam steps of 100 epochs at 64 (720 vs 700 at R_I = 5). The
# hypernetwork's cost is fixed per step, so PLE costs 1.6-1.8x MLE per generation here, 2.0x at batch 64
# (docs/performance.md); both estimators also train better.
MNIST5K_TRAIN = {"epochs": 240, "batch_size": 128}


class LoopStudySettings(Settings):
    """A study of the main loop. It carries its own params: ``params`` applies over madloop's built-in defaults,
    not over the top-level sections of params.yaml, so an experiment on the default study (``dvc exp run -S
    train.epochs=20``) never changes the paper's evidence; only ``seed`` (the data split) is shared."""

    # Five seeds, not three: a 95% t-interval's half-width is 2.48 seed standard deviations at 3 seeds, 1.24 at 5,
    # and a rounding change alone moved three-seed cells across a rule's line (README, "What the evidence says").
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    estimators: list[str] = Field(default_factory=lambda: ["mle", "ple", "hyper_nopenalty"], min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)  # e.g. {model: {vae: {hidden: [...]}}, train: {...}}

    @model_validator(mode="after")
    def valid_params(self) -> "LoopStudySettings":
        try:  # the loop's schema: it holds no study settings, so this never recurses into another study's
            p = validate({**self.params, "lineages": [{"name": e, "estimator": e} for e in self.estimators]})
        except ParamsError as err:
            raise ValueError(f"params: {str(err).removeprefix('invalid params: ')}") from None
        if FAMILIES.get(p.model.family).kind != "image":
            raise ValueError(f"params: a loop study needs an image family, got {p.model.family!r}")
        return self


def study_params(p: Params, settings: LoopStudySettings, name: str, lineages: list[dict[str, Any]],
                 generations: int, **data: Any) -> dict[str, Any]:
    """Params of one run of a loop study: the study's own ``params`` over the defaults, the project's seed,
    device and bookkeeping (tracking, dvc, plugins), the given lineages and data overrides."""
    sub = validate({**settings.params, "plugins": p.plugins}).model_dump(mode="json")
    sub.update(seed=p.seed, device=p.device, tracking=p.tracking.model_dump(mode="json"),
               dvc=p.dvc.model_dump(mode="json"), lineages=lineages)
    sub["study"]["name"] = name
    sub["loop"]["generations"] = generations
    sub["data"].update(data)
    return sub


def seed_lineages(estimators: list[str], seeds: list[int], **extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One lineage per (estimator, training seed), ``<estimator>-s<seed>``; ``extra``: name -> recipe (with
    ``estimator`` and ``set``) for further lineages, one per seed as well."""
    out = [{"name": f"{e}-s{s}", "estimator": e, "seed": s} for e in estimators for s in seeds]
    out += [{**recipe, "name": f"{name}-s{s}", "seed": s, "group": name} for name, recipe in extra.items()
            for s in seeds]
    return out


# --- claims and verdicts ------------------------------------------------------------------------------------------


@dataclass
class Claim:
    """One claim of the paper, the rule that decides it (stated before the numbers), the evidence, the verdict,
    and how many tests (conditions) it took, for the study's count of tests."""

    claim: str
    rule: str
    evidence: str
    verdict: str  # reproduced | inconclusive | not reproduced | not tested | void (a failed sanity rule)
    tests: int = 1

    def markdown(self) -> list[str]:
        return [f"- **{self.claim}** — verdict: **{self.verdict}**", f"  - Rule: {self.rule}",
                f"  - Evidence: {self.evidence}"]


def verdict_from(comparisons: list, direction: str = "positive") -> str:
    """The verdict of one claim tested once per condition: ``tasks.stats.verdict`` (Holm across the conditions;
    reproduced / inconclusive / not reproduced)."""
    return verdict(comparisons, direction)


def holm_texts(comparisons: list) -> list[str]:
    """Each condition's comparison as text, with its Holm-adjusted p across the claim's conditions."""
    return [c.text() for c in adjusted(comparisons)]


def tests_line(claims: list[Claim]) -> str:
    """The line a RESULTS.md section states its number of tests with."""
    return (f"{len(claims)} claims, {sum(c.tests for c in claims)} tests in all; within a claim p-values are "
            f"Holm-adjusted across its conditions; verdict rule: {VERDICT_RULE}.")


def loop_generations(project: Path, studies: list[str], started_at: float) -> dict[str, int]:
    """How many generations the loop studies hold, and how many of them an earlier run had finished (their
    manifests are older than this run), since a resumed study's run time covers only the rest."""
    manifests = [m for study in studies for m in (studies_folder(project) / study).glob("*/gen-*.json")]
    reused = sum(m.stat().st_mtime < started_at for m in manifests)
    return {"generations": len(manifests), "generations_reused": reused}


STYLE = {"mle": ("tab:red", "MLE"), "ple": ("tab:blue", "PLE (hypernetwork)"),
         "ple_closed": ("tab:green", "PLE (closed form)"), "hyper_nopenalty": ("tab:gray", "hypernetwork, lambda=0"),
         "mle_clipped": ("tab:pink", "MLE clipped to the box"),
         "ple_mean_lam1": ("tab:orange", "PLE, mean form, lambda=1"),
         "mle_factorised": ("tab:brown", "MLE through H's head, fixed input")}


def style(estimator: str) -> tuple[str, str]:
    """(colour, label) of an estimator in every figure."""
    return STYLE.get(estimator, ("tab:purple", estimator))


def errors(sel: list[dict], key: str) -> list[list[float]]:
    """Asymmetric error bars from summaries' 95% intervals (``{key}_low``, ``{key}_high``; zero where undefined)."""
    def gap(a: float, b: float) -> float:
        return max(a - b, 0.0) if math.isfinite(a) and math.isfinite(b) else 0.0

    return [[gap(num(s[key]), num(s.get(f"{key}_low"))) for s in sel],
            [gap(num(s.get(f"{key}_high")), num(s[key])) for s in sel]]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- RESULTS.md ---------------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def num(value: str | float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def floor_ratio(row: dict) -> float:
    """The matched-count R_Fair of dataset 0's own images (its floor), from a row's per-class real-vs-real FIDs."""
    majority = num(row.get("fid_floor_majority"))
    return num(row.get("fid_floor_minority")) / majority if majority > 0 else math.nan


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"


def timing(folder: Path) -> dict:
    path = folder / TIMING_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def run_time(t: dict) -> str:
    """'Run time **S s** on MACHINE', saying so when a resumed loop study took generations from an earlier run."""
    text = f"Run time **{t.get('seconds', 'n/a')} s** on {t.get('machine', 'n/a')}"
    reused, total = t.get("generations_reused", 0), t.get("generations", 0)
    if reused:
        text += (f" (a resumed run: {reused} of its {total} generations were finished by an earlier run, so this "
                 f"time covers the other {total - reused})")
    return text


# reports/frozen/<study>.md: a frozen study's section as the code of its run rendered it (its CSVs may lack what
# today's section reads); outside reports/<study>/, which is the stage's output as it ran
FROZEN_SECTIONS = "frozen"


def frozen_stages(root: Path) -> dict[str, str]:
    """The DVC stages of dvc.yaml that are frozen (``dvc repro`` does not re-run them, ``dvc status`` does not
    compare their dependencies with the code), each with why (``meta.frozen_because``): reports made by an earlier
    revision of the code, kept until they are re-run."""
    import yaml

    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {name: str((stage.get("meta") or {}).get("frozen_because", "")) for name, stage in stages.items()
            if stage.get("frozen")}


def frozen_note(name: str, why: str, t: dict) -> list[str]:
    """The line a frozen study's section opens with: its numbers come from an earlier revision of the code."""
    return [f"> **Not re-run under the current code** (its DVC stage is frozen): {why} These numbers are the run "
            f"that finished {t.get('finished', 'at an unrecorded time')}. To re-run it: `dvc unfreeze {name}`, then "
            f"`dvc repro {name}` (it resumes where an earlier run stopped), delete reports/frozen/{name}.md and "
            f"commit reports/{name}/ and dvc.lock.",
            ""]


def write_results(root: Path) -> Path:
    """reports/RESULTS.md, rendered from the studies' own CSVs and timings (no number in it is typed by hand). A
    study whose stage is frozen says so at the top of its section (:func:`frozen_note`)."""
    reports = Path(root) / "reports"
    frozen = frozen_stages(root)
    parts = ["# Results: the paper's evidence, reproduced with madloop", "",
             f"Paper: {PAPER} (../shared/seeds/001). Every number below is read from the CSVs next to this file, "
             "written by the study commands; `madloop study results` renders this page again.", ""]
    for study in sorted((e.obj for e in STUDIES.entries()), key=lambda s: (s.order, s.__name__)):
        name = next(e.name for e in STUDIES.entries() if e.obj is study)
        folder = reports / name
        snapshot = reports / FROZEN_SECTIONS / f"{name}.md"
        if name in frozen and snapshot.is_file():  # as rendered when it ran, by the code of then
            section = snapshot.read_text().rstrip("\n").split("\n")
        else:
            section = (study.section(folder) if folder.is_dir() and any(folder.glob("*.csv"))
                       else [f"## {name}", "", f"Not run yet: `madloop study {name}`."])
        if name in frozen:  # after the section's heading
            section = section[:2] + frozen_note(name, frozen[name], timing(folder)) + section[2:]
        parts += section + [""]
    path = reports / RESULTS_MD
    write_atomic(path, lambda tmp: tmp.write_text("\n".join(parts)))
    return path
