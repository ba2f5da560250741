"""Studies run as plain functions (no Prefect, DVC or MLflow): the runner the flows run (``tasks.study``), with no
observer but one that keeps the generations, for tests that need many small runs (the resume hash, mitigation
weights, the FID bound)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.datasets import Dataset, read_parquet
from tasks.generation import PLAIN, Generation, Steps
from tasks.layout import generation_files
from tasks.params import validate
from tasks.storage import read_manifest
from tasks.study import Observer, Study


def open_study(params: dict[str, Any], root: Path) -> Study:
    """A study's real data (written, as generation 0's manifest refers to it) and scorer, in ``root`` (a fresh
    one: no checks against the world)."""
    return Study.open(validate(params), root, check=False)


def dataset_zero(study_folder: Path, lineage: str) -> Dataset:
    """A lineage's dataset 0, read back from the file its generation-0 manifest says it trained on."""
    manifest = read_manifest(study_folder / lineage / generation_files(0)["manifest"])
    return read_parquet(study_folder.parents[2] / manifest["trained_on"]["path"])


class Kept(Observer):
    """Every generation the run makes, model and next dataset included."""

    def __init__(self):
        self.generations: list[Generation] = []

    def generation_done(self, run, generation: Generation) -> None:
        self.generations.append(generation)


def run_lineage(study: Study, name: str, generations: int, steps: Steps = PLAIN) -> list[Generation]:
    """Generations 0..generations-1 of one lineage (those not finished on disk yet)."""
    kept = Kept()
    study.run_lineage(name, observers=[kept], steps=steps, generations=generations)
    return kept.generations
