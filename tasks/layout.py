"""Where a study's files live: every path and file name madloop writes is spelled here, and only here.

Under the project root (``data/`` is DVC's, ``reports/`` is git's)::

    data/studies/<study>/.madloop.lock  the study lock (one writer per study: tasks.lock)
    data/studies/<study>/real/          train-s<seed>-<key>.parquet (each lineage seed's dataset 0), test.parquet,
                                        manifest.json
    data/studies/<study>/<lineage>/     dataset-001.parquet ...  the datasets generations 1.. train on
                                        model-000.safetensors ... generation k's model weights
                                        samples-000.png ...       a grid of its samples
                                        gen-000.json ...          manifest: params hash, sha256s, metrics
    data/cache/                         the domain classifier (and its manifest), keyed by the hash of its data
    reports/<study>/                    generations.csv, recipes.csv (DVC plots), metrics.json (DVC metrics),
                                        summary.md, lineages.csv / lineages.md (recipes ranked), recipes.png
    .madloop/trash/<time>/              whatever was replaced or quarantined, never deleted
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REAL = "real"  # the real data's folder: not a lineage name
REAL_TEST, REAL_MANIFEST = "test.parquet", "manifest.json"
GENERATIONS_CSV, METRICS_JSON, SUMMARY_MD = "generations.csv", "metrics.json", "summary.md"
RANKING_CSV, RANKING_MD, RECIPES_PNG = "lineages.csv", "lineages.md", "recipes.png"
RECIPES_CSV = "recipes.csv"  # per recipe and generation: mean and 95% interval over its seeds
TIMING_JSON = "timing.json"
LABELLER_JSON = "labeller.json"  # the image scorer's labeller, checked on held-out images (tasks.reports)
RESULTS_MD = "RESULTS.md"
REPORT_FILES = (RESULTS_MD,)  # files directly under reports/: no study may be named like them
STUDY_LOCK = ".madloop.lock"


def real_train_name(seed: int, key: str) -> str:
    """Dataset 0 of the lineages whose real draw has seed ``seed`` and recipe hash prefix ``key``, under real/."""
    return f"train-s{seed}-{key}.parquet"


def dataset_name(k: int) -> str:
    """Dataset k: the one generation k trains on (0 is the real training set)."""
    return f"dataset-{k:03d}.parquet"


def generation_files(k: int) -> dict[str, str]:
    """What generation k writes: the dataset generation k+1 trains on, its model, picture and manifest."""
    return {"dataset": dataset_name(k + 1), "model": f"model-{k:03d}.safetensors",
            "samples": f"samples-{k:03d}.png", "manifest": f"gen-{k:03d}.json"}


MANIFEST_GLOB = "gen-*.json"
GENERATION_FILE = re.compile(r"^(dataset|model|samples|gen)-(\d{3,})\.")


def generation_of(filename: str) -> int | None:
    """The generation that writes a file of a lineage folder (dataset k+1 is generation k's), or None."""
    match = GENERATION_FILE.match(filename)
    if match is None:
        return None
    k = int(match.group(2))
    return k - 1 if match.group(1) == "dataset" else k


@dataclass(frozen=True)
class StudyPaths:
    root: Path
    study: str

    @property
    def data(self) -> Path:
        return self.root / "data" / "studies" / self.study

    @property
    def real(self) -> Path:
        return self.data / REAL

    @property
    def real_manifest(self) -> Path:
        return self.real / REAL_MANIFEST

    def lineage(self, name: str) -> Path:
        return self.data / name

    @property
    def lock(self) -> Path:
        return self.data / STUDY_LOCK

    @property
    def reports(self) -> Path:
        return reports_folder(self.root, self.study)

    @property
    def cache(self) -> Path:
        return self.root / "data" / "cache"

    @property
    def trash(self) -> Path:
        return trash_folder(self.root)


def trash_folder(root: Path) -> Path:
    return root / ".madloop" / "trash"


def reports_folder(root: Path, name: str) -> Path:
    return root / "reports" / name


def studies_folder(root: Path) -> Path:
    return root / "data" / "studies"
