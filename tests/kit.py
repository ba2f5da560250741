"""Generations run as plain functions (no Prefect, DVC or MLflow): the body the flow runs, for tests that need
many small runs (the resume hash, mitigation weights, the FID bound)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.generation import PLAIN, Generation, Steps, open_lineage, resolve_device, run_generation
from tasks.datasets import Dataset, read_parquet
from tasks.layout import StudyPaths, generation_files
from tasks.storage import read_manifest
from tasks.params import Params, validate
from tasks.realdata import prepare_real_data
from tasks.scorers import build_scorer


@dataclass
class Study:
    p: Params
    paths: StudyPaths
    real: Any
    scorer: Any
    device: Any


def open_study(params: dict[str, Any], root: Path) -> Study:
    """A study's real data (written, as generation 0's manifest refers to it) and scorer, in ``root``."""
    p = validate(params)
    paths = StudyPaths(root, p.study.name)
    device = resolve_device(p.device)
    real = prepare_real_data(p, paths)
    scorer, _ = build_scorer(p, real, paths.cache, device)
    return Study(p, paths, real, scorer, device)


def dataset_zero(study_folder: Path, lineage: str) -> Dataset:
    """A lineage's dataset 0, read back from the file its generation-0 manifest says it trained on."""
    manifest = read_manifest(study_folder / lineage / generation_files(0)["manifest"])
    return read_parquet(study_folder.parents[2] / manifest["trained_on"]["path"])


def run_lineage(study: Study, name: str, generations: int, steps: Steps = PLAIN) -> list[Generation]:
    """Generations 0..generations-1 of one lineage, from scratch."""
    lin = open_lineage(study.p, name, study.paths, study.real, study.scorer, study.device)
    lin.mitigation.resume([])
    out, dataset = [], lin.real.train
    for k in range(generations):
        generation = run_generation(lin, k, dataset, steps)
        out.append(generation)
        dataset = generation.next_dataset
    return out
