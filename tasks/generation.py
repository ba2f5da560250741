"""One generation of one lineage, as one plain function: :func:`run_generation`.

    dataset[k] --fit(estimator, weights)--> model[k] --sample(n)--> synthetic[k+1] --next dataset--> dataset[k+1]
                                               '--score(vs held-out real)--> metrics[k]

The lineage flow (``flows.loop``) calls it with Prefect tasks as its steps, the benchmarks with the plain
functions: the same body either way. A :class:`Lineage` holds what every generation of one lineage shares: its
effective params, its parts (family, estimator, loop mode, mitigation), the real data and the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.estimators import ESTIMATORS, fit
from models.families import FittedTorchModel, TorchFamily, build_family
from tasks import as_task
from tasks.datasets import Dataset, RealData, data_digest, read_parquet, write_parquet
from tasks.layout import StudyPaths, dataset_name, generation_files
from tasks.mitigations import MITIGATIONS, Mitigation, MitigationContext
from tasks.modes import MODES, LoopMode, ModeContext
from tasks.params import (LineageParams, Params, ParamsError, core_loop, declared_settings, digest, lineage_params,
                          lineage_recipe, lineage_seed, score_recipe, section)
from tasks.realdata import StudyReal
from tasks.seeds import FIT, SAMPLE, SCORE, derive_seed
from tasks.storage import CorruptOutputError, file_digest, read_manifest, write_atomic, write_manifest


class TrainingDivergedError(RuntimeError):
    """A fit produced non-finite weights or samples: nothing of its generation is saved."""


def resolve_device(name: str) -> torch.device:
    """The torch device for params ``device``; one that this machine does not have is a params error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ParamsError(f"invalid params: device: {name!r} is not available here ({have}; torch "
                              f"{torch.__version__}): use device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"invalid params: device: {name!r} is not available here: use device: auto or cpu")
    return device


@dataclass
class Lineage:
    """Everything the generations of one lineage share."""

    spec: LineageParams
    params: Params  # the study's params with this lineage's overrides (its mode and mitigation see their share)
    paths: StudyPaths
    real: RealData  # this lineage's own: its dataset 0 (its seed's draw), the study's splits
    real_file: str  # the file under real/ that holds its dataset 0
    scorer: Any  # the study's scorer, seen from this lineage (its dataset 0, its classes' references)
    family: TorchFamily
    device: torch.device
    recipe: dict[str, Any]  # what decides its datasets and models (its hash is the resume key)
    score_hash: str  # what decides its metrics
    mode: LoopMode | None = None
    mitigation: Mitigation | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def folder(self) -> Path:
        return self.paths.lineage(self.spec.name)

    @property
    def seed(self) -> int:
        return lineage_seed(self.params, self.spec)


def open_lineage(study: Params, name: str, paths: StudyPaths, real: StudyReal, scorer, device) -> Lineage:
    """A lineage of ``study`` with its own real data (``real``: the study's, as :func:`tasks.realdata.
    prepare_real_data` drew it for each lineage) and the scorer's view of it."""
    spec = study.lineage(name)
    p = lineage_params(study, spec)
    score = score_recipe(p)
    if getattr(scorer, "fingerprint", ""):  # the weights its features come from (a retrained classifier: re-score)
        score["scorer.fingerprint"] = scorer.fingerprint
    own = real.of(name)
    lineage = Lineage(spec, p, paths, own, real.files[name], scorer.for_lineage(own),
                      build_family(p.model.family, own.train.shape, p.model), device, lineage_recipe(study, spec),
                      digest(score))
    # the parts get what they read (their contexts), never the lineage: each sees its own declared settings
    mode, mitigation = MODES.entry(p.loop.mode), MITIGATIONS.entry(spec.mitigation)
    both = dict(seed=lineage.seed, real=lineage.real, family=lineage.family, loop=core_loop(p), data=p.data)
    lineage.mode = mode.obj(ModeContext(**both, settings=declared_settings(p, mode.settings)))
    lineage.mitigation = mitigation.obj(MitigationContext(
        **both, settings=declared_settings(p, mitigation.settings), scorer=lineage.scorer, mode=lineage.mode,
        device=device, study_seed=p.seed))
    return lineage


# --- the steps ---------------------------------------------------------------------------------------------------


def fit_model(lineage: Lineage, data: Dataset, seed: int, sample_weight: np.ndarray | None = None,
              progress: Callable[[int, int], None] | None = None) -> FittedTorchModel:
    """Train the lineage's family on ``data`` with its estimator and the settings it declares; ``progress(done,
    total)`` hears of every epoch (models.estimators.fit). The rows' class labels go along for the hypernetworks'
    per-class diagnostics (they never change a fit)."""
    entry = ESTIMATORS.entry(lineage.spec.estimator)
    sections = {path.rsplit(".", 1)[-1]: section(lineage.params, path) for path in entry.settings}
    return fit(entry.name, lineage.family, data.pixels, seed=seed, device=lineage.device, sample_weight=sample_weight,
               progress=progress, groups=data.label, **sections)


def load_model(family: TorchFamily, tensors: dict[str, torch.Tensor], device: torch.device) -> FittedTorchModel:
    return FittedTorchModel(family, family.build().to(device)).load_tensors(
        {k: v.to(device) for k, v in tensors.items()})


def sample_synthetic(model: FittedTorchModel, n: int, seed: int, lineage: str, generation: int, source: str,
                     temperature: float = 1.0) -> Dataset:
    """n samples of ``model`` as a synthetic dataset; ``generation`` is the index of the dataset they enter."""
    return Dataset.synthetic(model.sample(n, seed, temperature), lineage, generation, source)


def score_model(scorer, model: FittedTorchModel, seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """Model k's samples (for its picture) and metrics, from the scorer of the family's kind."""
    return scorer.evaluate(model, seed)


def save_generation(folder: Path, k: int, tensors: dict[str, torch.Tensor], next_dataset: Dataset,
                    picture: Callable[[Path], None], metrics: dict[str, float], recipe: dict[str, Any],
                    score_hash: str, trained_on: dict[str, str], info: dict[str, Any]) -> dict[str, Any]:
    """Write generation k atomically, manifest last: a killed run leaves it either finished or not begun.
    ``picture(path)`` draws the generation's PNG (a sample grid, or a histogram against the truth)."""
    files = generation_files(k)
    outputs = {
        files["dataset"]: write_atomic(folder / files["dataset"], lambda tmp: write_parquet(next_dataset, tmp)),
        files["model"]: write_atomic(folder / files["model"], lambda tmp: save_file(tensors, str(tmp))),
        files["samples"]: write_atomic(folder / files["samples"], picture),
    }
    manifest = {
        "generation": k, "recipe_hash": digest(recipe), "recipe": recipe, "score_hash": score_hash,
        "trained_on": trained_on, "outputs": outputs, "metrics": metrics, "info": info,
        # DVC's content address of each file (md5), the link MLflow runs carry back to DVC
        "md5": {name: file_digest(folder / name, "md5") for name in outputs},
        "rows": {"trained_on": info.get("rows_trained_on"), "produced": len(next_dataset)},
    }
    manifest["data"] = {files["dataset"]: data_digest(next_dataset)}  # its content, for the next generation's check
    return write_manifest(folder / files["manifest"], manifest)


@dataclass(frozen=True)
class Steps:
    """The steps of a generation: plain functions, or the same functions as Prefect tasks."""

    fit: Callable = fit_model
    sample: Callable = sample_synthetic
    score: Callable = score_model
    save: Callable = save_generation


PLAIN = Steps()
TASKS = Steps(*(as_task(fn) for fn in (fit_model, sample_synthetic, score_model, save_generation)))


# --- one generation ----------------------------------------------------------------------------------------------


@dataclass
class Generation:
    k: int
    model: FittedTorchModel
    manifest: dict[str, Any]
    next_dataset: Dataset  # dataset k+1
    next_path: Path  # where it was written


def trained_on_record(lineage: Lineage, k: int, dataset: Dataset, rows: Dataset | None = None) -> dict[str, str]:
    """What model k was fitted on: the content sha256 of dataset k as the generation got it (in memory; resume
    checks it against what its producer recorded), the file it came from with the sha256 and md5 its writer
    recorded (the link back to DVC), and, when the loop mode trains on a subset of it (``rows``), that subset's."""
    path = dataset_path(lineage, k)
    producer = lineage.paths.real_manifest if k == 0 else lineage.folder / generation_files(k - 1)["manifest"]
    record = read_manifest(producer)
    out = {"path": str(path.relative_to(lineage.paths.root)), "sha256": record["outputs"][path.name],
           "md5": record["md5"][path.name], "data_sha256": data_digest(dataset)}
    if rows is not None and rows is not dataset:
        out["fit_data_sha256"] = data_digest(rows)
    return out


def check_finite(lineage: Lineage, k: int, what: str, tensors: dict[str, torch.Tensor]) -> None:
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingDivergedError(
            f"lineage {lineage.name!r}, generation {k}: training diverged, {what} hold NaN or inf "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); nothing of generation {k} was saved "
            f"(a smaller train.lr may help)")


def dataset_path(lineage: Lineage, k: int) -> Path:
    """Where dataset k is: the real training set for k = 0, else in the lineage's folder."""
    return lineage.paths.real / lineage.real_file if k == 0 else lineage.folder / dataset_name(k)


def run_generation(lineage: Lineage, k: int, dataset: Dataset, steps: Steps = PLAIN,
                   progress: Callable[[int, int], None] | None = None) -> Generation:
    """Generation k: the rows it trains on (mode), weights (mitigation), fit (estimator; ``progress`` hears of its
    epochs), model k (mitigation, by default as fitted), samples (as many candidates as the mitigation needs to
    keep the mode's count, then its selection), score, next dataset (mitigation, by default the mode), save (files,
    then the manifest)."""
    lin = lineage
    rows = lin.mode.training_rows(k, dataset)
    weights, weight_info = lin.mitigation.training_weights(k, rows)
    trained_on = trained_on_record(lin, k, dataset, rows)
    fitted = steps.fit(lin, rows, derive_seed(lin.seed, k, FIT), weights, progress)
    check_finite(lin, k, "its weights", fitted.tensors())
    model, fit_info = lin.mitigation.after_fit(k, fitted, rows)
    n = lin.mode.synthetic_rows()
    candidates = steps.sample(model, lin.mitigation.candidates(n), derive_seed(lin.seed, k, SAMPLE), lin.name, k + 1,
                              lin.params.data.source, lin.params.loop.temperature)
    check_finite(lin, k, "its samples", {"samples": torch.as_tensor(candidates.pixels)})
    synthetic, select_info = lin.mitigation.select(k, candidates, n)
    samples, metrics = score_generation(lin, k, model, rows, steps)
    metrics.update(**weight_info, **fit_info, **select_info)
    next_dataset, next_info = lin.mitigation.next_dataset(k, dataset, synthetic, metrics)
    metrics.update(next_info)
    caption = f"{lin.name}, generation {k}"
    manifest = steps.save(lin.folder, k, model.tensors(), next_dataset,
                          lambda path, s=samples: lin.scorer.picture(s, path, caption), metrics, lin.recipe,
                          lin.score_hash, trained_on, {**model.info, "rows_trained_on": len(rows)})
    return Generation(k, model, manifest, next_dataset, dataset_path(lin, k + 1))


def score_generation(lineage: Lineage, k: int, model: FittedTorchModel, rows: Dataset,
                     steps: Steps = PLAIN) -> tuple[np.ndarray, dict[str, float]]:
    """Model k's scores (the scorer's, with its seed for generation k) and those of the rows it trained on: what a
    generation records, and what a re-scored one records again (:func:`rescore`)."""
    samples, metrics = steps.score(lineage.scorer, model, derive_seed(lineage.seed, k, SCORE))
    metrics.update(lineage.scorer.dataset_metrics(rows))
    return samples, metrics


def rescore(lineage: Lineage, manifest: dict[str, Any], steps: Steps = PLAIN) -> dict[str, Any]:
    """A finished generation's manifest, its metrics recomputed (:func:`score_generation`) and written again when
    the scoring params changed since it was made; as it is otherwise."""
    if manifest.get("score_hash") == lineage.score_hash:
        return manifest
    k = manifest["generation"]
    model = load_model(lineage.family, load_generation_model(lineage.folder, k), lineage.device)
    dataset = lineage.real.train if k == 0 else load_generation_dataset(lineage.folder, k)
    _, metrics = score_generation(lineage, k, model, lineage.mode.training_rows(k, dataset), steps)
    kept = {key: value for key, value in manifest["metrics"].items() if key not in metrics}  # e.g. weight stats
    return rescore_manifest(lineage.folder, manifest, {**kept, **metrics}, lineage.score_hash)


def rescore_manifest(folder: Path, manifest: dict[str, Any], metrics: dict[str, float], score_hash: str) -> dict:
    manifest = {**manifest, "metrics": metrics, "score_hash": score_hash}
    return write_manifest(folder / generation_files(manifest["generation"])["manifest"], manifest)


def load_generation_model(folder: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(folder / generation_files(k)["model"]))


def load_generation_dataset(folder: Path, k: int) -> Dataset:
    """Dataset k (k >= 1) from its file, checked against the content sha256 its producer's manifest recorded."""
    data = read_parquet(folder / dataset_name(k))
    recorded = read_manifest(folder / generation_files(k - 1)["manifest"])["data"][dataset_name(k)]
    if data_digest(data) != recorded:
        raise CorruptOutputError(f"{folder / dataset_name(k)} does not hold the data generation {k - 1} made "
                                 "(its content sha256 differs from its manifest's)")
    return data
