"""Dataset 0: the study's real training and test data, written once per params and reused after that."""

from __future__ import annotations

import warnings

from models.families import build_family
from tasks import as_task
from tasks.datasets import RealData, data_digest, load_real, write_parquet
from tasks.layout import REAL_TEST, REAL_TRAIN, StudyPaths
from tasks.params import Params, digest, real_data_recipe
from tasks.storage import CorruptOutputError, file_digest, read_manifest, verify, write_atomic, write_manifest


def prepare_real_data(p: Params, paths: StudyPaths) -> RealData:
    """Load the source and write dataset 0 and the test split (reused when already written under these params,
    from the same source data: the manifest records the content of each split as well as its file)."""
    family = build_family(p.model.family, (1,), p.model)
    real = load_real(p.data, p.seed, paths.root, family)
    recipe = real_data_recipe(p)
    splits = {REAL_TRAIN: real.train, REAL_TEST: real.test}
    data = {name: data_digest(split) for name, split in splits.items()}
    if paths.real_manifest.is_file():
        try:
            manifest = read_manifest(paths.real_manifest)
            if manifest.get("recipe_hash") == digest(recipe):
                verify(paths.real_manifest, manifest["outputs"])
                if manifest.get("data") == data:
                    return real
                warnings.warn(f"{paths.real}: the source's data changed under the same params; writing it again "
                              "(lineages trained on the old data are redone)")
        except CorruptOutputError as err:
            warnings.warn(f"{err}; writing the real data again")
    outputs = {name: write_atomic(paths.real / name, lambda tmp, d=split: write_parquet(d, tmp))
               for name, split in splits.items()}
    write_manifest(paths.real_manifest, {
        "recipe_hash": digest(recipe), "recipe": recipe, "outputs": outputs, "data": data,
        "md5": {name: file_digest(paths.real / name, "md5") for name in outputs},
        "rows": {"train": len(real.train), "test": len(real.test)}})
    return real


prepare_real_data_task = as_task(prepare_real_data)
