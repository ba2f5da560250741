"""Dataset 0: the study's real training and test data, written once per params and reused after that."""

from __future__ import annotations

import warnings

from models.families import build_family
from tasks import as_task
from tasks.datasets import RealData, load_real, write_parquet
from tasks.layout import REAL_TEST, REAL_TRAIN, StudyPaths
from tasks.params import Params, digest, real_data_recipe
from tasks.storage import CorruptOutputError, read_json, verify, write_atomic, write_json_atomic


def prepare_real_data(p: Params, paths: StudyPaths) -> RealData:
    """Load the source and write dataset 0 and the test split (reused when already written under these params)."""
    family = build_family(p.model.family, (1,), p.model)
    real = load_real(p.data, p.seed, paths.root, family)
    recipe = real_data_recipe(p)
    if paths.real_manifest.is_file():
        manifest = read_json(paths.real_manifest)
        if manifest.get("recipe_hash") == digest(recipe):
            try:
                verify(paths.real_manifest, manifest["outputs"])
                return real
            except CorruptOutputError as err:
                warnings.warn(f"{err}; writing the real data again")
    outputs = {name: write_atomic(paths.real / name, lambda tmp, d=data: write_parquet(d, tmp))
               for name, data in ((REAL_TRAIN, real.train), (REAL_TEST, real.test))}
    write_json_atomic(paths.real_manifest, {"recipe_hash": digest(recipe), "recipe": recipe, "outputs": outputs,
                                            "rows": {"train": len(real.train), "test": len(real.test)}})
    return real


prepare_real_data_task = as_task(prepare_real_data)
