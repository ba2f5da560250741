"""What madloop reads is what it wrote: self-checking manifests, the study lock, leftovers of killed writes, the
content hash of datasets, and models that sample the same after a save and a load."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.estimators import ESTIMATORS, fit
from models.families import FAMILIES, build_family
from tasks.datasets import Dataset, data_digest, read_parquet, write_parquet
from tasks.generation import load_model
from tasks.lock import StudyLockedError, study_lock
from tasks.params import validate
from tasks.recovery import ensure_dvcignore
from tasks.storage import (CorruptOutputError, atomic_path, read_manifest, remove_stray_temps, write_atomic,
                           write_manifest)
from tests.conftest import BIN, REPO


# --- manifests ------------------------------------------------------------------------------------------------

def test_a_manifest_is_strict_json_and_checks_its_own_content(tmp_path):
    path = tmp_path / "gen-002.json"
    written = write_manifest(path, {"generation": 2, "recipe": {"lineage.name": "NaN"},
                                    "metrics": {"fid": 215.25, "fid_minority": math.nan, "kl": math.inf}})
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    back = read_manifest(path)
    assert back["metrics"]["fid"] == 215.25 and math.isnan(back["metrics"]["fid_minority"])
    assert back["metrics"]["kl"] == math.inf and back["recipe"]["lineage.name"] == "NaN"  # a name stays a name
    assert math.isnan(written["metrics"]["fid_minority"]) and written["generation"] == 2

    path.write_text(path.read_text().replace("215.25", "1.0"))  # the review's edit: FID 215 -> 1.0
    with pytest.raises(CorruptOutputError, match="was edited or is corrupt"):
        read_manifest(path)
    path.write_text(json.dumps({"generation": 2, "metrics": {"fid": 1.0}}))  # no checksum at all
    with pytest.raises(CorruptOutputError, match="has no checksum"):
        read_manifest(path)
    path.write_text('{"generation": 2, "metr')  # cut short
    with pytest.raises(CorruptOutputError, match="unreadable"):
        read_manifest(path)


def test_a_dataset_read_back_has_the_content_hash_it_was_written_with(tmp_path):
    rng = np.random.default_rng(0)
    data = Dataset.concat([Dataset.real(rng.random((5, 1, 8, 8)), np.arange(5), "digits"),
                           Dataset.synthetic(rng.random((3, 1, 8, 8)), "mle", 2, "digits")])
    write_parquet(data, tmp_path / "d.parquet")
    assert data_digest(read_parquet(tmp_path / "d.parquet")) == data_digest(data)
    changed = Dataset.concat([data.take(np.arange(7)), data.take(np.array([0]))])
    assert data_digest(changed) != data_digest(data)


# --- one writer per study --------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from tasks.lock import study_lock
with study_lock(Path(sys.argv[1]), "s"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_one_writer_per_study_says_who_holds_it_and_frees_it_when_the_holder_dies(tmp_path):
    lock = tmp_path / "data" / "studies" / "s" / ".madloop.lock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyLockedError) as err:
            with study_lock(lock, "s"):
                pass
        message = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "--wait" in message, message

        told, acquired = [], threading.Event()

        def waiter():
            with study_lock(lock, "s", wait=True, poll_seconds=0.05, on_wait=told.append):
                acquired.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        assert not acquired.is_set() and told and f"pid {holder.pid}" in told[0]
        os.kill(holder.pid, signal.SIGKILL)  # the kernel releases a dead holder's lock
        thread.join(timeout=30)
        assert acquired.is_set()
    finally:
        holder.kill()
        holder.wait()
    with study_lock(lock, "s"):
        with study_lock(lock, "s"):  # re-entrant: `madloop run` holds it while its flow takes it again
            assert f'"pid": {os.getpid()}' in lock.read_text()


# --- leftovers of killed writes ---------------------------------------------------------------------------------

def test_a_killed_atomic_write_leaves_a_temp_file_that_is_removed_and_that_dvc_ignores(tmp_path):
    root = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True)
    folder = root / "data" / "studies" / "s" / "mle"
    target = folder / "dataset-001.parquet"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:  # an interrupted write cleans up after itself
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not target.exists() and not list(folder.iterdir())
    stray = folder / f".dataset-001.parquet.{os.getpid()}-x1y2.tmp"  # what a kill -9 before the rename leaves
    stray.write_bytes(b"half")
    write_atomic(folder / "model-000.safetensors", lambda tmp: tmp.write_bytes(b"whole"))

    assert ensure_dvcignore(root) and not ensure_dvcignore(root)  # added once
    ignored = subprocess.run([str(BIN / "dvc"), "check-ignore", str(stray.relative_to(root))], cwd=root,
                             capture_output=True, text=True)
    assert ignored.returncode == 0, ignored.stdout + ignored.stderr
    assert remove_stray_temps(root / "data" / "studies" / "s") == [stray]
    assert sorted(p.name for p in folder.iterdir()) == ["model-000.safetensors"]


# --- save -> load -> the same samples, for every estimator ----------------------------------------------------

TINY_SETTINGS = {"train": {"epochs": 2, "batch_size": 32}, "ple": {"hidden": [8], "m": 1, "penalty_every": 1}}


def family_data(name: str) -> tuple:
    if FAMILIES.get(name).kind == "image":
        family = build_family(name, (1, 8, 8), validate({"model": {"vae": {"hidden": [32], "latent_dim": 4}}}).model)
        return family, np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    family = build_family(name, (1,), validate({"model": {"family": name}, "data": {"source": "model"}}).model)
    return family, family.true_sample(40, 0).astype(np.float32)


def pairs():
    """(estimator, family) for every estimator and one image and every scalar family it supports."""
    out = []
    for estimator in ESTIMATORS.names():
        supports = getattr(ESTIMATORS.get(estimator), "supports", None)
        for family in FAMILIES.names():
            if supports is None or supports(FAMILIES.get(family)) is None:
                out.append((estimator, family))
    return out


@pytest.mark.parametrize("estimator, family_name", [  # the fast tier keeps one save/load pair
    pytest.param(*pair, marks=() if i == 0 else pytest.mark.fit) for i, pair in enumerate(pairs())])
def test_a_saved_model_loads_and_samples_the_same(estimator, family_name, tmp_path):
    family, x = family_data(family_name)
    entry = ESTIMATORS.entry(estimator)
    sections = {path.rsplit(".", 1)[-1]: TINY_SETTINGS.get(path, {}) for path in entry.settings}
    model = fit(estimator, family, x, seed=0, **sections)
    before = model.sample(50, seed=3)
    if model.weights is not None:  # a hypernetwork's emitted weights are the model: they are what is saved
        saved = model.tensors()
        assert all(torch.equal(saved[name], w.detach().cpu()) for name, w in model.weights.items())
    save_file(model.tensors(), str(tmp_path / "model.safetensors"))
    loaded = load_model(family, load_file(str(tmp_path / "model.safetensors")), torch.device("cpu"))
    assert np.array_equal(loaded.sample(50, seed=3), before)
    assert not np.array_equal(loaded.sample(50, seed=4), before)  # the samples do depend on the seed


# --- MLflow: studies that share an experiment stay apart ---------------------------------------------------------

def test_studies_sharing_an_experiment_get_lineage_runs_of_their_own(tmp_path):
    from tasks.tracking import open_lineage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {study: open_lineage(uri, "shared", "mle", "same-recipe-hash", {"study": study}, tmp_path)[1]
            for study in ("s1", "s2")}
    assert runs["s1"] != runs["s2"]  # the same lineage params in two studies: not merged
    again = open_lineage(uri, "shared", "mle", "same-recipe-hash", {"study": "s1"}, tmp_path)[1]
    assert again == runs["s1"]  # a study resuming finds its own run


@pytest.mark.parametrize("override", ["device=cuda:99", "study.name=fig4", "tracking.uri=foo://bar",
                                      "loop.generations=true"])
def test_the_cli_refuses_hostile_values_before_writing_anything(override, project, capsys):
    from flows.cli import main as cli

    assert cli(["run", "--set", "lineages=[mle]", "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"madloop: invalid params: {override.split('=')[0]}:"), err
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()
