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

import os
import re
from dataclasses import dataclass
from pathlib import Path

REAL = "real"  # the real data's folder: not a lineage name
REAL_TEST, REAL_MANIFEST = "test.parquet", "manifest.json"
GENERATIONS_CSV, METRICS_JSON, SUMMARY_MD = "generations.csv", "metrics.json", "summary.md"
RANKING_CSV, RANKING_MD, RECIPES_PNG = "lineages.csv", "lineages.md", "recipes.png"
RECIPES_CSV = "recipes.csv"  # per recipe and generation: centre and 95% interval over its seeds
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


# --- names the filesystem must take ---------------------------------------------------------------------------

LONGEST_FILE_NAME = 64  # no file in a lineage folder has a longer name (.dataset-0001.parquet.<pid>-<random>.tmp)
DVC_SUFFIX = ".dvc"  # DVC's file beside each tracked folder: data/studies/<study>/<lineage>.dvc


def file_name_problem(root: Path, study: str, lineages: list[str]) -> tuple[str, str] | None:
    """(params key, why) when a study's or a lineage's files could not be made under ``root``: a file name longer
    than the filesystem takes (``<lineage>.dvc``, the study's folders), or a path longer than it takes (the deepest
    is a file moved to the trash). None when every name fits. Checked before any work: the system says only
    "File name too long", and for ``<lineage>.dvc`` only at ``dvc add``, after the lineage's work."""
    here = root.resolve()
    while not here.exists():  # the nearest folder that exists: where the limits are read
        here = here.parent
    name_max, path_max = os.pathconf(here, "PC_NAME_MAX"), os.pathconf(here, "PC_PATH_MAX")
    names = [("study.name", study, study)] + [("lineages", lineage, lineage + DVC_SUFFIX) for lineage in lineages]
    def short(text: str) -> str:
        return repr(text) if len(text) <= 40 else repr(text[:30] + "...") + f" ({len(text)} characters)"

    for key, name, longest in names:
        if len(longest.encode()) > name_max:
            return key, (f"{short(name)} makes a file name ({short(longest)}) of {len(longest.encode())} bytes; "
                         f"the filesystem at {here} takes at most {name_max}")
    trash = root.resolve() / ".madloop" / "trash" / "YYYYmmdd-HHMMSS"
    for key, name, _ in names[1:] or names:
        lineage = name if key == "lineages" else "real"
        deepest = trash / StudyPaths(Path("."), study).lineage(lineage) / ("x" * LONGEST_FILE_NAME)
        if len(str(deepest).encode()) >= path_max:
            return key, (f"{short(name)} makes paths of {len(str(deepest).encode())} bytes under a project root "
                         f"of {len(str(root.resolve()).encode())} (the deepest: a file moved to .madloop/trash/); "
                         f"the filesystem takes at most {path_max - 1}")
    return None
